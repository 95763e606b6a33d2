"""Run a training script as a submitit job, on Slurm or on this machine, with requeue-and-resume.

    python run_with_submitit.py --nodes 2 --ngpus 8 [--script main] <flags of the script>
    python run_with_submitit.py --cluster local --nodes 1 --ngpus 2 --device cpu <flags>   # dry run here

`--script` picks the entry point (Adventurer `main`, ARM `main_pretrain` or `main_finetune`); every flag of
that script is accepted, and `--help` lists them beside the launcher's. `--cluster` picks submitit's
executor: `slurm` (sbatch), `local` (this machine, one node: real subprocesses, pickles and signals) or
`debug` (one task inside this process, for pdb).

Job folder: `--job_dir`, `%j` standing for the job id; default `./output/submitit/%j`. It holds submitit's
logs and pickles and, as in the official launcher, the script's output (checkpoints, log.txt; also the ARM
scripts' TensorBoard events when `--log_dir` is left at its default). A local job's id exists only once it
runs, so there `%j` is replaced before submission by `local-<date>-<time>`.

Tasks: `--ngpus N` asks for N GPUs and N tasks per node, `--ngpus 0` for one task without a GPU; with
`--device cpu` the tasks are CPU processes on gloo. Every task takes its rank, local rank, world size and
the master address and port from submitit, in torchrun's variables (`--dist_url` becomes env://), so N
tasks train exactly as `torchrun --nproc_per_node N` would, and a job of one task exactly as `python
main.py` (not distributed: no RASampler, lr scaled for one process).

Preemption and time limits: Slurm signals the job (USR2, 120 s before the time limit); submitit then calls
Trainer.checkpoint() on global rank 0, which saves nothing (the kill follows soon) and hands the same job
back for requeueing. The first start runs the flags as given; every restart (this requeue, or one Slurm
makes itself, e.g. after a node failure) continues from the newest complete checkpoint in the job folder
(`--resume auto`, mid-epoch saves included; an explicit `--resume PATH` until the job has saved one).
What was trained since the last save is trained again: `--save-every-iters` bounds it.
submitit is optional (`pip install submitit`) and imported only here.
"""
import argparse
import copy
import datetime
import importlib
import os
import shlex
import sys
from pathlib import Path

from advarm import checkpoint, utils

REPO_ROOT = Path(__file__).resolve().parent
SCRIPTS = {"main": "main", "main_pretrain": "main_pretrain", "main_finetune": "Finetuning.main_finetune"}
CLUSTERS = ("slurm", "local", "debug")
DEFAULT_JOB_DIR = Path("output") / "submitit" / "%j"
TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
MAX_TIMEOUTS = 30  # official: requeue after up to 30 time limits (preemptions do not count)


def import_submitit():
    try:
        return importlib.import_module("submitit")
    except ImportError:
        raise SystemExit("run_with_submitit.py needs the optional package 'submitit': pip install submitit") from None


def entry_module(script):
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    return importlib.import_module(SCRIPTS[script])


def get_args_parser(script):
    """The chosen script's parser with -h and the launcher's flags (official ones first, then Slurm settings)."""
    parser = entry_module(script).get_args_parser()
    parser.prog = "run_with_submitit.py"
    parser.description = (f"Run {SCRIPTS[script].replace('.', '/')}.py as a submitit job: its own flags, then "
                          "the launcher's.")
    if not parser.add_help:  # main.py's parser is built to be a parent, without -h
        parser.add_argument("-h", "--help", action="help", help="show this help message and exit")
    launch = parser.add_argument_group("submitit launch")
    launch.add_argument("--script", choices=sorted(SCRIPTS), default="main",
                        help="entry point: Adventurer main, ARM main_pretrain or main_finetune")
    launch.add_argument("--cluster", choices=CLUSTERS, default="slurm",
                        help="slurm: sbatch; local: subprocesses on this machine; debug: in this process")
    launch.add_argument("--ngpus", default=8, type=int, help="GPUs and tasks per node (0: one task, no GPU)")
    launch.add_argument("--nodes", default=2, type=int, help="number of nodes")
    launch.add_argument("--timeout", default=2800, type=int, help="job duration in minutes")
    launch.add_argument("--job_dir", default="", type=str,
                        help="job folder, %%j = job id (empty: ./output/submitit/%%j)")
    launch.add_argument("--partition", default="main", type=str, help="Slurm partition")
    launch.add_argument("--use_volta32", action="store_true", help="request 32 GB V100s (constraint volta32gb)")
    launch.add_argument("--comment", default="", type=str, help="Slurm comment, e.g. a priority message")
    slurm = parser.add_argument_group("Slurm settings passed through to sbatch")
    slurm.add_argument("--mem_gb", default=None, type=float, help="memory per node (default: 12 per task)")
    slurm.add_argument("--cpus_per_task", default=8, type=int)
    slurm.add_argument("--account", default="", type=str)
    slurm.add_argument("--qos", default="", type=str)
    slurm.add_argument("--constraint", default="", type=str, help="node features (with --use_volta32: both)")
    slurm.add_argument("--exclude", default="", type=str, help="nodes to avoid, e.g. node[01-04]")
    return parser


def parse_args(argv=None):
    pre = argparse.ArgumentParser(prog="run_with_submitit.py", add_help=False)
    pre.add_argument("--script", choices=sorted(SCRIPTS), default="main")
    args = get_args_parser(pre.parse_known_args(argv)[0].script).parse_args(argv)
    check_args(args)
    return args


def check_args(args):
    if args.nodes < 1 or args.ngpus < 0 or args.timeout < 1:
        raise SystemExit(f"--nodes {args.nodes} --ngpus {args.ngpus} --timeout {args.timeout}: need at least one "
                         "node, zero or more GPUs and one minute")
    if args.cluster == "local" and args.nodes != 1:
        raise SystemExit("--cluster local runs on this machine, one node: pass --nodes 1 (--ngpus N for N tasks)")
    if args.cluster == "debug" and (args.nodes != 1 or args.ngpus > 1):
        raise SystemExit("--cluster debug runs one task inside this process: pass --nodes 1 and --ngpus 0 or 1")


def job_folder(args):
    """Absolute job folder; `%j` is left to submitit, except on the local cluster (see the module docstring)."""
    folder = str(Path(args.job_dir or DEFAULT_JOB_DIR).expanduser().absolute())
    if args.cluster == "local":
        # submitit's local controller would also create a literal `%j` folder before each start.
        folder = folder.replace("%j", f"local-{datetime.datetime.now():%Y%m%d-%H%M%S-%f}")
    return folder


def make_executor(submitit, args, folder):
    """submitit's AutoExecutor with the official resources (12 GB and 8 CPUs per task, USR2 120 s early)."""
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=args.cluster, slurm_max_num_timeout=MAX_TIMEOUTS,
                                         local_max_num_timeout=MAX_TIMEOUTS)
    except RuntimeError as err:  # e.g. no srun on this machine
        raise SystemExit(f"--cluster {args.cluster}: {err} (--cluster local runs the job on this machine)") from None
    tasks = max(args.ngpus, 1)
    # Tasks import the entry points (and unpickle the job) from this repository, whatever their cwd.
    setup = [f"export PYTHONPATH={shlex.quote(str(REPO_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"]
    constraint = "&".join(c for c in (args.constraint, "volta32gb" if args.use_volta32 else "") if c)
    slurm = {f"slurm_{name}": value for name, value in (("account", args.account), ("qos", args.qos),
                                                        ("constraint", constraint), ("exclude", args.exclude),
                                                        ("comment", args.comment)) if value}
    executor.update_parameters(
        name="pt", nodes=args.nodes, tasks_per_node=tasks, gpus_per_node=args.ngpus or None,
        cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb or 12 * tasks, timeout_min=args.timeout,
        slurm_partition=args.partition, slurm_signal_delay_s=120, slurm_setup=setup, local_setup=setup, **slurm)
    return executor


def export_task_environment(dist_env):
    """Describe this task in torchrun's variables, so that the scripts' init_distributed_mode joins the group.

    A job of one task is left a plain single process, as `python main.py` is.
    """
    if dist_env.world_size == 1:
        for name in TORCHRUN_VARIABLES:
            os.environ.pop(name, None)
        return
    os.environ.update(RANK=str(dist_env.rank), LOCAL_RANK=str(dist_env.local_rank),
                      WORLD_SIZE=str(dist_env.world_size), LOCAL_WORLD_SIZE=str(dist_env.local_world_size),
                      MASTER_ADDR=str(dist_env.master_addr), MASTER_PORT=str(dist_env.master_port))


class Trainer:
    """The picklable job: every task runs the script's `main`; submitit requeues it when signalled.

    `self.args` stay as parsed. The scripts change the args they run with (main.py scales --lr in place,
    --resume is resolved), so each start runs on a copy and a requeue carries the original flags.
    """

    def __init__(self, args):
        self.args = args
        self.requeues = 0

    def __call__(self):
        submitit = import_submitit()
        job_id = submitit.JobEnvironment().job_id
        dist_env = submitit.helpers.TorchDistributedEnvironment()
        args = copy.deepcopy(self.args)
        for name in ("job_dir", "output_dir", "log_dir"):
            if getattr(args, name, None):
                setattr(args, name, getattr(args, name).replace("%j", job_id))
        export_task_environment(dist_env)
        args.world_size, args.dist_url = dist_env.world_size, "env://"
        # Slurm counts its requeues (ours and its own, e.g. after a node failure); the local cluster has only ours.
        restarted = self.requeues > 0 or int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0
        if restarted and not getattr(args, "eval", False):
            continue_job(args)
        print(f"Task {dist_env.rank} of {dist_env.world_size} (job {job_id}{', restarted' if restarted else ''}): "
              f"{args.script}, output {args.output_dir}, resume {args.resume or 'none'}", flush=True)
        entry_module(args.script).main(args)

    def checkpoint(self):
        """Called by submitit on global rank 0 when the job is signalled: requeue this job, which resumes."""
        submitit = import_submitit()
        print("Signalled: requeuing; the job resumes from its newest complete checkpoint", flush=True)
        self.requeues += 1
        return submitit.helpers.DelayedSubmission(self)


def continue_job(args):
    """A restart resumes (`--resume auto` on the job folder); an explicit --resume only until the job has saved."""
    if not args.resume or checkpoint.latest_checkpoint(args.output_dir) is not None:
        args.resume = "auto"
    args.overwrite = False  # what the first start moved aside stays aside; this start continues it


def write_into(args, folder):
    """As officially, the script writes into the job folder: --output_dir, and the ARM scripts' default --log_dir."""
    defaults = entry_module(args.script).get_args_parser()
    if args.output_dir not in (defaults.get_default("output_dir"), folder):
        print(f"note: the job writes into its job folder {folder}, not --output_dir {args.output_dir} "
              f"(choose the folder with --job_dir)")
    args.job_dir = args.output_dir = folder
    if hasattr(args, "log_dir") and args.log_dir == defaults.get_default("log_dir"):
        utils.resolve_log_dir(args)  # off, with a note, when tensorboard is absent
        if args.log_dir:
            args.log_dir = folder  # beside the checkpoints, not in the working directory


def main(argv=None):
    args = parse_args(argv)
    submitit = import_submitit()
    folder = job_folder(args)
    write_into(args, folder)
    executor = make_executor(submitit, args, folder)
    try:
        job = executor.submit(Trainer(args))
    except RuntimeError as err:  # sbatch refused the job
        raise SystemExit(f"submission failed: {err}") from None
    print(f"Submitted job {job.job_id} ({args.cluster}); job folder {job.paths.folder}")
    if args.cluster == "local":
        print(f"follow it with: tail -f {job.paths.stdout}")
    if args.cluster == "debug":
        job.result()  # debug jobs run here, on request
    return job


if __name__ == "__main__":
    main()
