"""run_with_submitit.py against a fake submitit module: executor settings, task setup, requeue-and-resume."""
import argparse
import os
import sys
import types
from pathlib import Path

import pytest

import run_with_submitit as launcher
from advarm import checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def restore_environment():
    """The launcher exports RANK/WORLD_SIZE/LOCAL_RANK and PYTHONPATH; later tests must not see them."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def fake_submitit(monkeypatch):
    record = {}

    class AutoExecutor:
        def __init__(self, folder, slurm_max_num_timeout):
            record.update(folder=folder, max_timeouts=slurm_max_num_timeout, params={})

        def update_parameters(self, **params):
            record["params"].update(params)

        def submit(self, trainer):
            record["trainer"] = trainer
            return types.SimpleNamespace(job_id="4242")

    class JobEnvironment:
        job_id, local_rank, global_rank, num_tasks = "4242", 3, 11, 16

    module = types.SimpleNamespace(AutoExecutor=AutoExecutor, JobEnvironment=JobEnvironment,
                                   helpers=types.SimpleNamespace(DelayedSubmission=lambda fn: ("delayed", fn)))
    monkeypatch.setitem(sys.modules, "submitit", module)
    return record


@pytest.fixture
def fake_entry(monkeypatch):
    """A stand-in `main` entry point: its own flags plus a main(args) that records what it got."""
    calls = []

    def get_args_parser():
        parser = argparse.ArgumentParser("fake entry")
        parser.add_argument("--lr", type=float, default=1e-3)
        parser.add_argument("--output_dir", default="")
        parser.add_argument("--resume", default="")
        parser.add_argument("--dist_url", default="env://")
        return parser

    monkeypatch.setitem(sys.modules, "main", types.SimpleNamespace(get_args_parser=get_args_parser,
                                                                   main=lambda args: calls.append(args)))
    return calls


def test_submission_uses_the_official_executor_settings(fake_submitit, fake_entry, tmp_path, monkeypatch):
    if Path("/mnt/data").is_dir():
        pytest.skip("/mnt/data exists here, so the default job dir is the official shared one")
    monkeypatch.chdir(tmp_path)
    job = launcher.main(["--lr", "0.5", "--ngpus", "4", "--nodes", "3", "--timeout", "60",
                         "--use_volta32", "--comment", "deadline"])
    assert job.job_id == "4242"
    job_dir = str(tmp_path / "experiments" / "%j")
    assert fake_submitit["folder"] == job_dir and fake_submitit["max_timeouts"] == 30
    assert fake_submitit["params"] == dict(
        mem_gb=48, gpus_per_node=4, tasks_per_node=4, cpus_per_task=8, nodes=3, timeout_min=60,
        slurm_partition="main", slurm_signal_delay_s=120, name="pt",
        slurm_constraint="volta32gb", slurm_comment="deadline")
    args = fake_submitit["trainer"].args
    assert args.lr == 0.5 and args.output_dir == job_dir and args.script == "main"
    assert args.dist_url.startswith((tmp_path / "experiments").as_uri()) and args.dist_url.endswith("_init")
    assert os.environ["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)


def test_task_takes_its_rank_from_the_job_environment(fake_submitit, fake_entry, tmp_path):
    args = argparse.Namespace(script="main", output_dir=str(tmp_path / "%j"), resume="")
    launcher.Trainer(args)()
    ran = fake_entry[0]
    assert (ran.gpu, ran.rank, ran.world_size) == (3, 11, 16)
    assert ran.output_dir == str(tmp_path / "4242") and Path(ran.output_dir).is_dir()
    # utils.init_distributed_mode then takes the torchrun path with the file:// rendezvous.
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("11", "16", "3")


def test_requeue_resumes_from_the_furthest_complete_checkpoint(fake_submitit, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checkpoint.save_checkpoint({"epoch": 4}, tmp_path / "checkpoint-4.pth")
    checkpoint.save_checkpoint({"epoch": 9}, tmp_path / "checkpoint.pth")
    (tmp_path / "checkpoint-10.pth").write_bytes(b"PK\x03\x04 killed mid-write")
    args = argparse.Namespace(script="main", output_dir=str(tmp_path), resume="", dist_url="file:///old_init")
    kind, trainer = launcher.Trainer(args).checkpoint()
    assert kind == "delayed" and isinstance(trainer, launcher.Trainer)
    assert trainer.args.resume == str(tmp_path / "checkpoint.pth")
    assert trainer.args.dist_url != "file:///old_init" and trainer.args.dist_url.endswith("_init")


def test_requeue_before_any_checkpoint_keeps_the_resume_setting(fake_submitit, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(script="main", output_dir=str(tmp_path / "empty"), resume="auto", dist_url="")
    _, trainer = launcher.Trainer(args).checkpoint()
    assert trainer.args.resume == "auto"


def test_missing_submitit_names_the_package(fake_entry, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)
    with pytest.raises(SystemExit, match="pip install submitit"):
        launcher.main(["--lr", "0.1"])


@pytest.mark.parametrize("script, path", [("main", "main.py"), ("main_pretrain", "main_pretrain.py"),
                                          ("main_finetune", "Finetuning/main_finetune.py")])
def test_real_entry_points_accept_the_launcher_flags(script, path):
    if not (ROOT / path).is_file():
        pytest.skip(f"{path} not present")
    args = launcher.parse_args(["--script", script, "--nodes", "1", "--ngpus", "2", "--job_dir", "/x/%j"])
    assert (args.script, args.nodes, args.ngpus, args.job_dir) == (script, 1, 2, "/x/%j")
    assert hasattr(args, "output_dir") and hasattr(args, "resume") and hasattr(args, "dist_url")
    assert callable(launcher.entry_module(script).main)
