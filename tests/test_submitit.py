"""run_with_submitit.py on the real submitit package: local jobs train, survive preemption bit for bit and
agree across two tasks; the launcher's flags, its sbatch file and its errors.

The LocalExecutor jobs are real: a controller process starts the tasks, which unpickle the job and run the
script, and a requeue is submitit's own (the task exits with 144 and the controller starts it again).

How preemption is simulated: Slurm, and submitit's local controller, deliver the checkpoint signal (USR2)
to the tasks. submitit's own requeue test has the controller send it on a wall-clock timeout
(`timeout_min - signal_delay_s`), which would land at an iteration that depends on the machine's speed,
and `LocalJob._interrupt()` signals the controller rather than the tasks (submitit 1.5.4: the controller
dies of it). So `PreemptedOnce` raises that same signal inside the task right after optimiser step N of
its first start; from there on (submitit's handler, Trainer.checkpoint, the pickled resubmission, the
requeue and the restart) everything is submitit's.
"""
import functools
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import run_with_submitit as launcher
from advarm import checkpoint

ROOT = Path(__file__).resolve().parents[1]
ITERS = 12  # iterations per epoch (--max-iters-per-epoch)
SAVE_EVERY = 5  # --save-every-iters: the preempted runs resume from iteration 5 of their epoch
ADVENTURER = ["--script", "main", "--device", "cpu", "--data-set", "DIGITS", "--model", "adventurer_tiny_patch16",
              "--model-kwargs", "depth=2", "embed_dim=32", "patch_size=8", "--input-size", "32", "--batch-size", "32",
              "--epochs", "2", "--max-iters-per-epoch", str(ITERS), "--save-every-iters", str(SAVE_EVERY),
              "--warmup-epochs", "1", "--lr", "0.05", "--model-ema-decay", "0.9", "--amp", "none",
              "--num_workers", "0", "--log-every", "100"]  # default augmentation, mixup, drop-path: all RNGs used
ARM = ["--device", "cpu", "--data-set", "DIGITS", "--input_size", "16", "--batch_size", "16", "--epochs", "1",
       "--max-iters-per-epoch", str(ITERS), "--save-every-iters", str(SAVE_EVERY), "--warmup_epochs", "1",
       "--amp", "none", "--num_workers", "0", "--log_dir", "", "--model", "arm_base_pz16"]
PRETRAIN = ["--script", "main_pretrain", *ARM,
            "--model-kwargs", "img_size=16", "patch_size=2", "depth=4", "embed_dim=16", "dec_embed_dim=32"]
FINETUNE = ["--script", "main_finetune", *ARM, "--model-kwargs", "patch_size=2", "depth=2", "embed_dim=16",
            "--ema_decay", "0.9", "--blr", "0.05"]
LOCAL = ["--cluster", "local", "--nodes", "1", "--ngpus", "0"]


@pytest.fixture(scope="module")
def submitit():
    return pytest.importorskip("submitit", reason="run_with_submitit.py needs the optional package submitit "
                                                  "(pip install submitit; CI installs it)")


@pytest.fixture(scope="module")
def by_value():
    """Jobs built from the Trainer subclasses below: their pickles carry this module's code."""
    import cloudpickle

    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    yield
    cloudpickle.unregister_pickle_by_value(module)


class PreemptedOnce(launcher.Trainer):
    """Signalled like a preempted Slurm job right after optimiser step `at_step` of its first start.

    Every start appends {"requeues": ..., "steps": optimiser steps it trained} to attempts.jsonl.
    """

    def __init__(self, args, at_step):
        super().__init__(args)
        self.at_step = at_step

    def __call__(self):
        import submitit

        requeues, steps = self.requeues, []

        def after_step(optimizer, *_):
            steps.append(1)
            if requeues == 0 and len(steps) == self.at_step:
                signal.raise_signal(submitit.JobEnvironment._usr_sig())

        hook = register_optimizer_step_post_hook(after_step)
        try:
            return super().__call__()
        finally:
            hook.remove()
            folder = Path(self.args.output_dir.replace("%j", submitit.JobEnvironment().job_id))
            with (folder / "attempts.jsonl").open("a") as f:
                f.write(json.dumps({"requeues": requeues, "steps": len(steps)}) + "\n")


class KeepsEveryRank(launcher.Trainer):
    """Saves each rank's final weights (model and EMA) as rank<R>.pt in the job folder."""

    def __call__(self):
        import main

        run = main.main

        def main_keeping_weights(args):
            result = run(args)
            state = {"model": result["model"].state_dict(), "ema": result["model_ema"].module.state_dict()}
            torch.save(state, Path(args.output_dir) / f"rank{os.environ.get('RANK', 0)}.pt")
            return result

        main.main = main_keeping_weights
        return super().__call__()


def run_job(argv, cwd, trainer=None):
    """Submit through launcher.main from `cwd`, wait for the job; returns (job, its folder)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        patch.setenv("OMP_NUM_THREADS", "1")  # tiny models: one thread per task, as in the in-process runs
        for name in ("SUBMITIT_PREEMPT_SIGNAL", "SLURM_RESTART_COUNT", *launcher.TORCHRUN_VARIABLES):
            patch.delenv(name, raising=False)
        if trainer is not None:
            patch.setattr(launcher, "Trainer", trainer)
        job = launcher.main(argv)
    try:
        job.results()
    except Exception as err:  # submitit's errors carry the task's traceback
        pytest.fail(f"job {job.job_id} failed: {err}\n--- stdout ---\n{(job.stdout() or '')[-5000:]}")
    return job, Path(job.paths.folder)


def run_plain(script, argv, output_dir):
    """`python <script>.py <flags>` in a fresh process, the reference a job must equal.

    Not in this process: a first run differs from a later one in the same process (importing scikit-learn
    for DIGITS draws from Python's global random stream once), and a job's task is always a first run.
    """
    path = ROOT / (launcher.SCRIPTS[script].replace(".", "/") + ".py")
    done = subprocess.run([sys.executable, str(path), *argv, "--output_dir", str(output_dir)], cwd=output_dir.parent,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def log_rows(folder):
    return [json.loads(line) for line in (Path(folder) / "log.txt").read_text().splitlines()]


def newest_checkpoint(folder):
    return checkpoint.load_checkpoint_file(checkpoint.latest_checkpoint(folder))


def assert_same_tensors(first, second, what):
    assert first.keys() == second.keys(), what
    for key in first:
        assert torch.equal(first[key], second[key]), f"{what}: {key} differs"


def assert_same_training_state(ckpt, reference):
    """Weights, EMA and optimiser moments identical to the reference run's."""
    assert ckpt["epoch"] == reference["epoch"]
    assert_same_tensors(ckpt["model"], reference["model"], "model")
    if reference.get("model_ema") is not None:
        assert_same_tensors(ckpt["model_ema"], reference["model_ema"], "model_ema")
    for index, state in reference["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(ckpt["optimizer"]["state"][index][name]), torch.as_tensor(value)), \
                f"optimizer state {index}.{name} differs"


def script_flags(argv):
    """The flags of the entry point alone (what `python main.py ...` gets)."""
    return argv[2:]  # after --script NAME


@pytest.fixture(scope="module")
def uninterrupted(submitit, tmp_path_factory):
    """A 2-epoch Adventurer job on the local cluster, run from an empty working directory with the default
    job folder."""
    cwd = tmp_path_factory.mktemp("cwd")
    job, folder = run_job([*LOCAL, *ADVENTURER], cwd)
    return job, folder, cwd


# ---------------------------------------------------------------------------------------------------
# real jobs on submitit's local and debug executors


@pytest.mark.slow
def test_local_job_trains_to_completion_and_keeps_everything_in_its_job_folder(uninterrupted):
    job, folder, cwd = uninterrupted
    assert job.state == "FINISHED" and job.results() == [None]
    assert folder.parent == cwd / "output" / "submitit" and folder.name.startswith("local-")
    assert [p.name for p in cwd.iterdir()] == ["output"]  # nothing else in the working directory: no %j/
    assert len(list((cwd / "output" / "submitit").iterdir())) == 1
    names = {p.name for p in folder.iterdir()}
    assert {f"{job.job_id}_0_log.out", f"{job.job_id}_0_log.err", f"{job.job_id}_submitted.pkl",
            f"{job.job_id}_0_result.pkl", "log.txt", "checkpoint.pth"} <= names
    assert [row["epoch"] for row in log_rows(folder)] == [0, 1]
    assert newest_checkpoint(folder)["epoch"] == 1
    assert "Not using distributed mode" in job.stdout()  # one task runs as a plain single process


@pytest.mark.slow
def test_one_task_job_trains_exactly_as_python_main(uninterrupted, tmp_path):
    """Same flags, same numbers: no RASampler, lr scaled for one process, seed + rank 0."""
    _, folder, _ = uninterrupted
    run_plain("main", script_flags(ADVENTURER), tmp_path / "plain")
    assert_same_training_state(newest_checkpoint(folder), newest_checkpoint(tmp_path / "plain"))
    assert log_rows(folder) == log_rows(tmp_path / "plain")


@pytest.mark.slow
def test_job_preempted_mid_epoch_requeues_and_finishes_as_if_never_stopped(uninterrupted, by_value, tmp_path):
    """Preempted 4 iterations after the mid-epoch save of epoch 2 (global step ITERS + 9).

    What cannot be equal: epoch 2's `train_*` entries in log.txt are averages over the iterations the
    restarted task ran (its meters start afresh): the loss differs, the lr only in its last bits. Everything
    else is compared exactly: weights, EMA, optimiser state and the evaluations in log.txt.
    """
    _, reference, _ = uninterrupted
    at_step = ITERS + SAVE_EVERY + 4
    job, folder = run_job([*LOCAL, *ADVENTURER, "--job_dir", str(tmp_path / "jobs" / "%j")], tmp_path,
                          functools.partial(PreemptedOnce, at_step=at_step))
    assert "Requeued job" in job.stdout()
    attempts = [json.loads(line) for line in (folder / "attempts.jsonl").read_text().splitlines()]
    # The restart trains the rest of epoch 2 from its mid-epoch save: not the whole epoch, not from scratch.
    assert attempts == [{"requeues": 0, "steps": at_step}, {"requeues": 1, "steps": ITERS - SAVE_EVERY}]
    rows, expected = log_rows(folder), log_rows(reference)
    assert [row["epoch"] for row in rows] == [0, 1]
    assert rows[0] == expected[0]
    comparable = [k for k in expected[1] if not k.startswith("train_")]
    assert {k: rows[1][k] for k in comparable} == {k: expected[1][k] for k in comparable}
    assert rows[1]["train_lr"] == pytest.approx(expected[1]["train_lr"], rel=1e-12)
    assert_same_training_state(newest_checkpoint(folder), newest_checkpoint(reference))


@pytest.mark.slow
@pytest.mark.parametrize("argv", [PRETRAIN, FINETUNE], ids=["main_pretrain", "main_finetune"])
def test_arm_job_preempted_once_finishes_as_the_uninterrupted_run(argv, submitit, by_value, tmp_path):
    """One epoch, preempted 3 iterations after its mid-epoch save, against a plain `python <script>.py` run."""
    at_step = SAVE_EVERY + 3
    job, folder = run_job([*LOCAL, *argv, "--job_dir", str(tmp_path / "jobs" / "%j")], tmp_path,
                          functools.partial(PreemptedOnce, at_step=at_step))
    attempts = [json.loads(line) for line in (folder / "attempts.jsonl").read_text().splitlines()]
    assert attempts == [{"requeues": 0, "steps": at_step}, {"requeues": 1, "steps": ITERS - SAVE_EVERY}]
    run_plain(argv[1], script_flags(argv), tmp_path / "plain")
    assert [row["epoch"] for row in log_rows(folder)] == [0]
    assert_same_training_state(newest_checkpoint(folder), newest_checkpoint(tmp_path / "plain"))


@pytest.mark.slow
def test_two_task_job_trains_as_torchrun_with_identical_ranks(submitit, by_value, tmp_path, torchrun_main):
    """2 CPU processes on gloo, ranks and rendezvous from submitit: both ranks end with the same weights,
    and with the weights `torchrun --nproc_per_node 2` gives for the same flags (RASampler, lr x 2)."""
    flags = [*ADVENTURER, "--epochs", "1", "--max-iters-per-epoch", "4", "--dist-eval"]
    job, folder = run_job(["--cluster", "local", "--nodes", "1", "--ngpus", "2", *flags,
                           "--job_dir", str(tmp_path / "job")], tmp_path, KeepsEveryRank)
    assert "distributed init (rank 0/2, gloo): env://" in job.stdout()
    ranks = [torch.load(folder / f"rank{r}.pt") for r in (0, 1)]
    for part in ("model", "ema"):
        assert_same_tensors(ranks[0][part], ranks[1][part], f"rank 1 {part}")

    torchrun = torchrun_main([*script_flags(flags), "--output_dir", str(tmp_path / "torchrun")])[0][0]
    for part in ("model", "ema"):
        assert_same_tensors(ranks[0][part], torchrun[part], f"torchrun {part}")


def run_debug_job(argv, cwd, monkeypatch):
    monkeypatch.chdir(cwd)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return launcher.main(["--cluster", "debug", "--nodes", "1", "--ngpus", "0", *argv])
    finally:
        torch.set_num_threads(threads)


def test_debug_cluster_runs_the_job_in_this_process(submitit, tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    job = run_debug_job([*ADVENTURER, "--epochs", "1", "--max-iters-per-epoch", "2"], tmp_path, monkeypatch)
    folder = Path(job.paths.folder)
    assert job.state == "DONE" and folder.parent == tmp_path / "output" / "submitit"
    assert job.job_id.startswith("DEBUG_") and folder.name == job.job_id
    assert (folder / f"{job.job_id}_0_log.out").is_file() and newest_checkpoint(folder)["epoch"] == 0
    assert "RANK" not in os.environ and "WORLD_SIZE" not in os.environ


def test_a_restart_slurm_makes_itself_continues_the_job(submitit, tmp_path, monkeypatch):
    """A node failure requeues the job as submitted (Trainer.checkpoint never ran): SLURM_RESTART_COUNT says so."""
    flags = [*ADVENTURER, "--max-iters-per-epoch", "2", "--job_dir", str(tmp_path / "job")]
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    run_debug_job([*flags, "--epochs", "1"], tmp_path, monkeypatch)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    run_debug_job([*flags, "--epochs", "2"], tmp_path, monkeypatch)  # as if the first start died after epoch 1
    assert [row["epoch"] for row in log_rows(tmp_path / "job")] == [0, 1]


# ---------------------------------------------------------------------------------------------------
# what a requeued start resumes from


@pytest.mark.parametrize("resume, saved, expected", [("", False, "auto"), ("", True, "auto"),
                                                     ("auto", False, "auto"), ("other.pth", False, "other.pth"),
                                                     ("other.pth", True, "auto")])
def test_a_restart_resumes_from_the_job_folder_once_it_holds_a_checkpoint(resume, saved, expected, tmp_path):
    if saved:
        checkpoint.save_checkpoint({"epoch": 3}, tmp_path / "checkpoint.pth")
    args = launcher.parse_args(["--output_dir", str(tmp_path), "--resume", resume, "--overwrite"])
    launcher.continue_job(args)
    assert args.resume == expected
    assert args.overwrite is False  # what the first start moved aside stays aside


@pytest.mark.parametrize("script", ["main", "main_pretrain", "main_finetune"])
def test_the_script_writes_into_the_job_folder(script, capsys):
    """Also the ARM scripts' TensorBoard events (default --log_dir), where tensorboard is installed."""
    args = launcher.parse_args(["--script", script])
    launcher.write_into(args, "/jobs/%j")
    assert args.output_dir == args.job_dir == "/jobs/%j"
    if script != "main":
        assert args.log_dir == ("/jobs/%j" if importlib.util.find_spec("tensorboard") else "")
    assert "note" not in capsys.readouterr().out
    args = launcher.parse_args(["--script", script, "--output_dir", "/mine"])
    launcher.write_into(args, "/jobs/%j")
    assert args.output_dir == "/jobs/%j" and "not --output_dir /mine" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------
# flags, sbatch file, errors


@pytest.mark.parametrize("script, own_flag", [("main", "--batch-size"), ("main_pretrain", "--blr"),
                                              ("main_finetune", "--layer_decay")])
def test_help_lists_the_launcher_flags_beside_the_scripts(script, own_flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        launcher.parse_args(["--script", script, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--ngpus", "--nodes", "--timeout", "--job_dir", "--partition", "--use_volta32", "--comment",
                 "--cluster", "--mem_gb", "--cpus_per_task", "--account", "--qos", "--constraint", "--exclude",
                 own_flag):
        assert flag in text, flag


def test_official_launcher_defaults_are_kept():
    args = launcher.parse_args([])
    assert (args.script, args.ngpus, args.nodes, args.timeout, args.job_dir, args.partition, args.use_volta32,
            args.comment, args.cluster) == ("main", 8, 2, 2800, "", "main", False, "", "slurm")


def test_sbatch_file_carries_the_slurm_settings(submitit, tmp_path, monkeypatch):
    """The real SlurmExecutor (a stand-in `srun` on PATH is all it needs) renders the launcher's settings."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    args = launcher.parse_args(["--nodes", "3", "--ngpus", "4", "--timeout", "60", "--use_volta32",
                                "--comment", "deadline", "--account", "vision", "--qos", "high", "--constraint",
                                "ib", "--exclude", "node[01-02]", "--cpus_per_task", "6"])
    executor = launcher.make_executor(submitit, args, str(tmp_path / "%j"))
    text = executor._executor._make_submission_file_text("python -m submitit.core._submit", "uid")
    for line in ("--job-name=pt", "--nodes=3", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=6",
                 "--mem=48GB", "--time=60", "--partition=main", "--signal=USR2@120", "--comment=deadline",
                 "--account=vision", "--qos=high", "--constraint='ib&volta32gb'", "--exclude='node[01-02]'"):
        assert f"#SBATCH {line}\n" in text, line
    assert f"export PYTHONPATH={ROOT}" in text
    cpu_only = launcher.make_executor(submitit, launcher.parse_args(["--nodes", "1", "--ngpus", "0"]),
                                      str(tmp_path / "%j"))
    text = cpu_only._executor._make_submission_file_text("python", "uid")
    assert "--gpus-per-node" not in text and "#SBATCH --ntasks-per-node=1\n" in text and "--mem=12GB" in text


@pytest.mark.parametrize("argv, message", [
    (["--cluster", "local"], "--cluster local runs on this machine, one node: pass --nodes 1"),
    (["--cluster", "debug", "--nodes", "1", "--ngpus", "2"], "--cluster debug runs one task"),
    (["--nodes", "0"], "need at least one node"),
])
def test_impossible_launches_end_with_one_line(argv, message):
    with pytest.raises(SystemExit, match=message):
        launcher.parse_args(argv)


def test_slurm_without_srun_ends_with_one_line(submitit, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SystemExit, match="--cluster slurm: .*srun.*--cluster local"):
        launcher.main(["--job_dir", str(tmp_path / "%j")])


def test_missing_submitit_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)
    with pytest.raises(SystemExit, match="pip install submitit"):
        launcher.main(["--cluster", "local", "--nodes", "1"])
