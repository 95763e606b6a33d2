"""advarm.utils: launcher detection, CPU collectives, metric logging, AMP parsing, seeding."""
import argparse
import builtins
import os
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist

from advarm import utils

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


def test_metric_logger_accepts_iterables_without_length(capsys):
    logger = utils.MetricLogger()
    seen = list(logger.log_every((torch.zeros(2, 1) for _ in range(3)), print_freq=2, header="Stream"))
    out = capsys.readouterr().out.splitlines()
    assert len(seen) == 3 and [line.split()[1] for line in out[:-1]] == ["[0]", "[2]"] and "eta" not in out[0]
