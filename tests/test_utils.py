"""advarm.utils and advarm.loggers: launcher detection, CPU collectives, metric logging, AMP parsing, experiment logging."""
import argparse
import builtins
import json
import os
import random
import sys
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist

from advarm import loggers, utils

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_LOCALID", "MASTER_ADDR", "MASTER_PORT",
                 "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK")


@pytest.fixture
def clean_launch():
    """No launcher variables, and print/environment restored afterwards (init replaces builtins.print)."""
    saved_env, saved_print = dict(os.environ), builtins.print
    for name in LAUNCHER_VARS:
        os.environ.pop(name, None)
    yield
    builtins.print = saved_print
    os.environ.clear()
    os.environ.update(saved_env)


@pytest.fixture
def fake_group(monkeypatch):
    """Record init_process_group/barrier calls instead of joining a real group."""
    calls = {}
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.update(kw))
    monkeypatch.setattr(dist, "barrier", lambda *a, **kw: calls.setdefault("barrier", True))
    return calls


def test_single_process_without_launcher(clean_launch):
    args = argparse.Namespace(device="cpu", dist_url="env://")
    utils.init_distributed_mode(args)
    assert (args.rank, args.world_size, args.gpu, args.distributed, args.dist_backend) == (0, 1, 0, False, "gloo")
    assert utils.get_world_size() == 1 and utils.is_main_process() and utils.all_reduce_mean(2.5) == 2.5


def test_torchrun_variables_and_print_silenced_on_other_ranks(clean_launch, fake_group, capsys):
    os.environ.update(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1")
    args = argparse.Namespace(device="cpu", dist_url="env://", local_rank=-1)
    utils.init_distributed_mode(args)
    assert (args.rank, args.world_size, args.gpu, args.distributed) == (3, 4, 1, True)
    assert fake_group["backend"] == "gloo" and fake_group["init_method"] == "env://" and fake_group["rank"] == 3
    capsys.readouterr()
    print("hidden on rank 3")
    print("shown", force=True)
    assert capsys.readouterr().out == "shown\n"


def test_legacy_local_rank_flag_is_the_fallback(clean_launch, fake_group):
    os.environ.update(RANK="1", WORLD_SIZE="2")
    args = argparse.Namespace(device="cpu", dist_url="env://", local_rank=1)
    utils.init_distributed_mode(args)
    assert args.gpu == 1


def test_slurm_task_uses_procid_localid_and_the_launcher_world_size(clean_launch, fake_group):
    os.environ.update(SLURM_PROCID="5", SLURM_LOCALID="1")
    args = argparse.Namespace(device="cpu", dist_url="file:///tmp/x_init", world_size=8)
    utils.init_distributed_mode(args)
    assert (args.rank, args.gpu, args.world_size) == (5, 1, 8)
    assert fake_group["init_method"] == "file:///tmp/x_init" and fake_group["world_size"] == 8


def test_single_task_slurm_allocation_runs_as_one_process(clean_launch, fake_group):
    os.environ.update(SLURM_PROCID="0")
    args = argparse.Namespace(device="cpu", dist_url="env://", world_size=1)
    utils.init_distributed_mode(args)
    assert args.distributed is False and "init_method" not in fake_group


def test_openmpi_variables(clean_launch, fake_group):
    os.environ.update(OMPI_COMM_WORLD_RANK="2", OMPI_COMM_WORLD_SIZE="4", OMPI_COMM_WORLD_LOCAL_RANK="0",
                      MASTER_ADDR="node7", MASTER_PORT="1234")
    args = argparse.Namespace(device="cpu", dist_url="env://", dist_on_itp=True)
    utils.init_distributed_mode(args)
    assert (args.rank, args.world_size, args.gpu) == (2, 4, 0)
    assert fake_group["init_method"] == "tcp://node7:1234" and os.environ["RANK"] == "2"


def test_openmpi_without_its_variables_is_a_clear_error(clean_launch):
    with pytest.raises(SystemExit, match="OMPI_COMM_WORLD_RANK"):
        utils.init_distributed_mode(argparse.Namespace(device="cpu", dist_on_itp=True))


def test_gloo_group_of_one_reduces_meters_on_cpu(clean_launch, tmp_path):
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    args = argparse.Namespace(device="cpu", dist_url=(tmp_path / "init").as_uri())
    utils.init_distributed_mode(args)
    try:
        assert args.distributed and dist.get_backend() == "gloo"
        meter = utils.SmoothedValue()
        meter.update(2.0, n=3)
        meter.synchronize_between_processes()
        assert (meter.count, meter.total) == (3, 6.0)
        assert utils.all_reduce_mean(1.5) == 1.5
        utils.barrier()
    finally:
        dist.destroy_process_group()


def test_smoothed_value_statistics():
    meter = utils.SmoothedValue(window_size=3)
    for value in (1.0, 2.0, 3.0, 10.0):
        meter.update(value, n=2)
    assert meter.value == 10.0 and meter.max == 10.0 and meter.median == 3.0
    assert meter.avg == pytest.approx(5.0) and meter.global_avg == pytest.approx(4.0)


def test_metric_logger_prints_progress_and_averages(capsys):
    logger = utils.MetricLogger(delimiter="  ")
    logger.add_meter("lr", utils.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    batches = [(torch.zeros(4, 3), torch.zeros(4)) for _ in range(5)]
    for step, _ in enumerate(logger.log_every(batches, print_freq=2, header="Epoch: [0]")):
        logger.update(loss=torch.tensor(float(step)), lr=0.5)
    out = capsys.readouterr().out.splitlines()
    assert [line.split("]")[1].split()[0] for line in out[:-1]] == ["[0/5", "[2/5", "[4/5"]
    assert "lr: 0.500000" in out[-2] and "img/s:" in out[-2] and "eta:" in out[-2] and "data:" in out[-2]
    assert out[-1].startswith("Epoch: [0] Total time:")
    assert logger.loss.global_avg == 2.0
    with pytest.raises(AttributeError):
        logger.accuracy


def test_parse_amp_and_autocast():
    assert utils.parse_amp("bfloat16") is torch.bfloat16 and utils.parse_amp("float16") is torch.float16
    assert utils.parse_amp("") is None and utils.parse_amp("none") is None and utils.parse_amp(None) is None
    with pytest.raises(ValueError, match="mixed-precision"):
        utils.parse_amp("float8")
    a = torch.ones(2, 2)
    with utils.autocast("cpu", "bfloat16"):
        assert (a @ a).dtype == torch.bfloat16
    with utils.autocast(torch.device("cpu"), "none"):
        assert (a @ a).dtype == torch.float32


def test_start_run_seeds_python_numpy_and_torch_with_seed_plus_rank(clean_launch, monkeypatch):
    """timm's random_seed as start_run calls it: seed + global rank in all three generators (official rule)."""
    def draw():
        return random.random(), np.random.rand(), torch.rand(1).item()

    random.seed(12), np.random.seed(12), torch.manual_seed(12)
    expected = draw()
    monkeypatch.setattr(utils, "get_rank", lambda: 2)
    utils.start_run(argparse.Namespace(seed=10, device="cpu", output_dir="", ssm_backend="auto", resume="",
                                       log_dir=""))
    assert draw() == expected


def test_count_parameters():
    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    assert utils.count_parameters(model) == 6 and utils.count_parameters(model, trainable_only=False) == 8


EPOCHS = [{"train_lr": 1e-3, "train_loss": 2.0 - e / 2, "test_loss": 2.1 - e / 2, "test_acc1": 10.0 * e,
           "ema_test_acc1": 9.0 * e, "epoch": e, "n_parameters": 6} for e in range(3)]


def test_experiment_logger_writes_official_log_and_curves(tmp_path):
    pytest.importorskip("matplotlib")
    logger = loggers.ExperimentLogger(argparse.Namespace(), tmp_path / "run")
    for stats in EPOCHS:
        logger.log(stats, step=stats["epoch"])
    logger.close()
    lines = (tmp_path / "run" / "log.txt").read_text().splitlines()
    assert [json.loads(line) for line in lines] == EPOCHS
    png = tmp_path / "run" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_curves_skipped_with_a_note_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    logger = loggers.ExperimentLogger(argparse.Namespace(), tmp_path)
    logger.log(EPOCHS[0], step=0)
    logger.close()
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert (tmp_path / "log.txt").is_file() and not (tmp_path / "curves.png").exists()


def test_logger_is_silent_on_other_ranks(tmp_path, monkeypatch):
    monkeypatch.setattr(utils, "is_main_process", lambda: False)
    logger = loggers.ExperimentLogger(argparse.Namespace(if_wandb=True, mlflow=True, tensorboard=True), tmp_path)
    logger.log(EPOCHS[0], step=0)
    logger.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags, module, package", [
    ({"if_wandb": True}, "wandb", "wandb"),
    ({"mlflow": True}, "mlflow", "mlflow-skinny"),
    ({"log_dir": "tb"}, "torch.utils.tensorboard", "tensorboard"),
    ({"tensorboard": True}, "torch.utils.tensorboard", "tensorboard"),
])
def test_missing_optional_package_exits_with_the_pip_name(tmp_path, monkeypatch, flags, module, package):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(SystemExit, match=f"pip install {package}"):
        loggers.ExperimentLogger(argparse.Namespace(**flags), tmp_path)


def test_enabled_trackers_receive_params_and_metrics(tmp_path, monkeypatch):
    calls = []
    wandb = types.SimpleNamespace(
        init=lambda **kw: calls.append(("wandb.init", kw)) or types.SimpleNamespace(id="run42"),
        log=lambda stats: calls.append(("wandb.log", stats)), finish=lambda: calls.append(("wandb.finish",)))
    mlflow = types.SimpleNamespace(
        set_tracking_uri=lambda uri: calls.append(("mlflow.uri", uri)),
        start_run=lambda run_name: calls.append(("mlflow.start", run_name)),
        log_params=lambda params: calls.append(("mlflow.params", params)),
        log_metrics=lambda metrics, step: calls.append(("mlflow.metrics", metrics, step)),
        end_run=lambda: calls.append(("mlflow.end",)))

    class Writer:
        def __init__(self, log_dir):
            calls.append(("tb.dir", str(log_dir)))

        def add_scalar(self, tag, value, step):
            calls.append(("tb", tag, value, step))

        def close(self):
            calls.append(("tb.close",))

    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(model="tiny", if_wandb=True, wandb_resume=None, mlflow=True, log_dir="",
                              tensorboard=True, output_dir=tmp_path / "exp7")
    logger = loggers.ExperimentLogger(args, tmp_path / "exp7")
    logger.log({"train_loss": 1.0, "epoch": 0}, step=0)
    logger.add_scalar("lr", 0.1, 5)
    logger.close()
    recorded = {c[0]: c[1:] for c in calls}
    assert recorded["wandb.init"][0]["name"] == "exp_tiny" and args.wandb_resume == "run42"
    assert recorded["mlflow.uri"][0] == (tmp_path / "mlruns").as_uri() and os.environ["MLFLOW_ALLOW_FILE_STORE"] == "true"
    assert recorded["mlflow.start"][0] == "exp7" and recorded["mlflow.params"][0]["output_dir"] == str(tmp_path / "exp7")
    assert recorded["mlflow.metrics"] == ({"train_loss": 1.0, "epoch": 0.0}, 0)
    assert recorded["tb.dir"][0] == str(tmp_path / "exp7") and ("tb", "lr", 0.1, 5) in calls
    assert {"wandb.finish", "mlflow.end", "tb.close"} <= set(recorded)


def test_wandb_start_failure_explains_offline_mode(tmp_path, monkeypatch):
    def refuse(**kwargs):
        raise RuntimeError("No API key configured")

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=refuse))
    with pytest.raises(SystemExit, match="No API key configured.*WANDB_MODE=offline"):
        loggers.ExperimentLogger(argparse.Namespace(if_wandb=True), tmp_path)


def test_metric_logger_accepts_iterables_without_length(capsys):
    logger = utils.MetricLogger()
    seen = list(logger.log_every((torch.zeros(2, 1) for _ in range(3)), print_freq=2, header="Stream"))
    out = capsys.readouterr().out.splitlines()
    assert len(seen) == 3 and [line.split()[1] for line in out[:-1]] == ["[0]", "[2]"] and "eta" not in out[0]
