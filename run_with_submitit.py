"""Launch a training script on Slurm through submitit, with requeue-and-resume on timeout or preemption.

    python run_with_submitit.py --nodes 2 --ngpus 8 [--script main] <flags of the script>

`--script` picks the entry point (Adventurer `main`, ARM `main_pretrain` or `main_finetune`); every flag of
that script is accepted here. Each Slurm task runs `main(args)` of the script with its rank taken from
submitit. Logs, checkpoints and the job's output go to `--job_dir` (`%j` = Slurm job id); when it is empty,
`/mnt/data/$USER/experiments/%j` as in the official launcher, or `./experiments/%j` when /mnt/data does not
exist. The process-group rendezvous file always goes to that shared folder (/mnt/data/$USER/experiments or
./experiments, also when `--job_dir` points elsewhere), so it must be visible from every node.
submitit is optional (`pip install submitit`) and imported only here.
"""
import argparse
import importlib
import os
import sys
import uuid
from pathlib import Path

from advarm.checkpoint import latest_checkpoint

REPO_ROOT = Path(__file__).resolve().parent
SCRIPTS = {"main": "main", "main_pretrain": "main_pretrain", "main_finetune": "Finetuning.main_finetune"}


def import_submitit():
    try:
        return importlib.import_module("submitit")
    except ImportError:
        raise SystemExit("run_with_submitit.py needs the optional package 'submitit': pip install submitit") from None


def entry_module(script):
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    return importlib.import_module(SCRIPTS[script])


def parse_args(argv=None):
    """The chosen script's own parser, extended with the Slurm options."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--script", choices=sorted(SCRIPTS), default="main")
    script = pre.parse_known_args(argv)[0].script
    parser = entry_module(script).get_args_parser()
    parser.prog = "run_with_submitit.py"
    slurm = parser.add_argument_group("Slurm launch (submitit)")
    slurm.add_argument("--script", choices=sorted(SCRIPTS), default="main",
                       help="entry point to run: Adventurer main, ARM main_pretrain or main_finetune")
    slurm.add_argument("--ngpus", default=8, type=int, help="GPUs (and tasks) per node")
    slurm.add_argument("--nodes", default=2, type=int, help="number of nodes")
    slurm.add_argument("--timeout", default=2800, type=int, help="job duration in minutes")
    slurm.add_argument("--job_dir", default="", type=str,
                       help="job folder, %%j = job id; empty: /mnt/data/$USER/experiments/%%j or ./experiments/%%j")
    slurm.add_argument("--partition", default="main", type=str, help="Slurm partition")
    slurm.add_argument("--use_volta32", action="store_true", help="request 32 GB V100s (constraint volta32gb)")
    slurm.add_argument("--comment", default="", type=str, help="Slurm comment, e.g. a priority message")
    return parser.parse_args(argv)


def shared_folder():
    """Folder for job dirs and rendezvous files; it must be on a filesystem every node sees."""
    if Path("/mnt/data").is_dir():
        folder = Path("/mnt/data") / os.environ.get("USER", "user") / "experiments"
    else:
        folder = Path.cwd() / "experiments"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def new_init_file():
    """A fresh file:// rendezvous path (the file itself must not exist yet)."""
    return (shared_folder() / f"{uuid.uuid4().hex}_init").as_uri()


class Trainer:
    """The picklable job: runs the script's main on each task; on timeout requeues itself resuming."""

    def __init__(self, args):
        self.args = args

    def __call__(self):
        submitit = import_submitit()
        job_env = submitit.JobEnvironment()
        args = self.args
        args.output_dir = str(args.output_dir).replace("%j", str(job_env.job_id))
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        args.gpu = job_env.local_rank
        args.rank = job_env.global_rank
        args.world_size = job_env.num_tasks
        # The launcher variables make utils.init_distributed_mode take the torchrun path with the file://
        # rendezvous in args.dist_url, under Slurm and submitit's local executor alike.
        os.environ.update(RANK=str(args.rank), WORLD_SIZE=str(args.world_size), LOCAL_RANK=str(args.gpu))
        print(f"Process group: {job_env.num_tasks} tasks, rank {job_env.global_rank}")
        entry_module(args.script).main(args)

    def checkpoint(self):
        """Called by submitit before the job is killed: resume from the furthest complete checkpoint."""
        submitit = import_submitit()
        self.args.dist_url = new_init_file()
        found = latest_checkpoint(self.args.output_dir)
        if found is not None:
            self.args.resume = str(found)
        print(f"Requeuing, resume={self.args.resume or 'none'}")
        return submitit.helpers.DelayedSubmission(type(self)(self.args))


def main(argv=None):
    args = parse_args(argv)
    submitit = import_submitit()
    job_dir = args.job_dir or str(shared_folder() / "%j")
    executor = submitit.AutoExecutor(folder=job_dir, slurm_max_num_timeout=30)
    extra = {}
    if args.use_volta32:
        extra["slurm_constraint"] = "volta32gb"
    if args.comment:
        extra["slurm_comment"] = args.comment
    executor.update_parameters(
        mem_gb=12 * args.ngpus, gpus_per_node=args.ngpus, tasks_per_node=args.ngpus, cpus_per_task=8,
        nodes=args.nodes, timeout_min=args.timeout, slurm_partition=args.partition, slurm_signal_delay_s=120,
        name="pt", **extra)
    # Jobs inherit this environment: let them unpickle the Trainer and import the entry points from any cwd.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    args.job_dir = job_dir
    args.dist_url = new_init_file()
    args.output_dir = job_dir
    job = executor.submit(Trainer(args))
    print("Submitted job_id:", job.job_id)
    return job


if __name__ == "__main__":
    main()
