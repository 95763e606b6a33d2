"""advarm.runs and advarm.cli: the run-folder lock, resume checks, random state in checkpoints, flag checks."""
import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from advarm import checkpoint, cli, runs

ROOT = Path(__file__).resolve().parents[1]


def _namespace(**kwargs):
    base = dict(output_dir="", resume="", eval=False, overwrite=False)
    return argparse.Namespace(**{**base, **kwargs})


def test_lock_names_its_holder_refuses_a_second_process_and_is_removed_on_release(tmp_path):
    lock = runs.RunLock(tmp_path).acquire()  # (reading run.lock here would drop the POSIX lock: see RunLock)
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); from advarm import runs\n"
             "try:\n    runs.RunLock(sys.argv[2]).acquire()\nexcept SystemExit as err:\n    print(err)")
    other = subprocess.run([sys.executable, "-c", probe, str(ROOT), str(tmp_path)], capture_output=True, text=True,
                           timeout=120)
    assert f"is in use by another run (host {os.uname().nodename}, pid {os.getpid()}, since " in other.stdout, \
        other.stdout + other.stderr
    lock.release()
    assert not (tmp_path / "run.lock").exists()


def test_a_lock_left_by_a_dead_run_is_taken_over(tmp_path, capsys):
    (tmp_path / "run.lock").write_text("host gone, pid 999999999, since 2020-01-01 00:00:00")
    lock = runs.RunLock(tmp_path).acquire()
    assert "left by a run that no longer runs (host gone, pid 999999999" in capsys.readouterr().out
    assert f"pid {os.getpid()}" in (tmp_path / "run.lock").read_text()
    lock.release()


def test_run_folder_refuses_another_run_unless_overwrite_moves_it_aside(tmp_path, capsys):
    (tmp_path / "checkpoint.pth").write_bytes(b"x")
    (tmp_path / "log.txt").write_text('{"epoch": 0}\n')
    with pytest.raises(SystemExit, match="already holds a run \\(checkpoint.pth, log.txt\\)"):
        with runs.run_folder(_namespace(output_dir=str(tmp_path))):
            pass
    assert not (tmp_path / "run.lock").exists()
    with runs.run_folder(_namespace(output_dir=str(tmp_path), overwrite=True)):
        assert (tmp_path / "run.lock").exists()
    (aside,) = tmp_path.glob("replaced-*")
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoint.pth", "log.txt"]
    with runs.run_folder(_namespace(output_dir=str(tmp_path / "fresh"), eval=True)):  # evaluation never locks
        assert not (tmp_path / "fresh" / "run.lock").exists()


def test_trim_log_keeps_earlier_epochs_and_rows_without_one(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text('{"epoch": 0}\n{"eval": true}\n{"epoch": 1}\n{"epoch": 2}\n{"epo')
    runs.trim_log(tmp_path, 2)
    assert [json.loads(line) for line in log.read_text().splitlines()] == [{"epoch": 0}, {"eval": True}, {"epoch": 1}]


def test_changed_flags_apply_with_one_line_and_model_flags_stop(capsys):
    old = _namespace(lr=1e-3, epochs=4, seed=0, model="a", num_workers=8, output_dir="x")
    changed = runs.check_resumed_flags(_namespace(lr=2e-3, epochs=8, seed=1, model="a", num_workers=2),
                                       {"args": old}, "ck.pth")
    assert set(changed) == {"lr", "epochs", "seed"}  # num_workers and output_dir change nothing computed
    (line,) = capsys.readouterr().out.splitlines()
    assert line == ("note: resuming ck.pth with flags that differ from its run: epochs 4 -> 8, lr 0.001 -> 0.002 (the "
                    "new values apply); seed 0 -> 1 (kept: the random streams continue the checkpoint's)")
    with pytest.raises(checkpoint.CheckpointError, match="ck.pth is a run of another model \\(model 'a' -> 'b'\\)"):
        runs.check_resumed_flags(_namespace(model="b"), {"args": old}, "ck.pth")
    assert runs.check_resumed_flags(_namespace(model="b"), {"model": {}}, "bare.pth") == {}  # nothing to compare


def test_optimizer_state_is_restored_with_this_runs_hyper_parameters():
    param = torch.nn.Parameter(torch.ones(3))
    old = torch.optim.AdamW([param], lr=1e-3, weight_decay=0.05)
    param.grad = torch.ones(3)
    old.step()
    new = torch.optim.AdamW([param], lr=5e-3, weight_decay=0.1)
    runs.load_optimizer_state(new, old.state_dict(), "ck.pth")
    assert (new.param_groups[0]["lr"], new.param_groups[0]["weight_decay"]) == (5e-3, 0.1)
    assert float(new.state[param]["step"]) == 1.0
    assert torch.equal(new.state[param]["exp_avg"], old.state[param]["exp_avg"])
    with pytest.raises(checkpoint.CheckpointError, match="ck.pth: cannot restore the optimizer"):
        runs.load_optimizer_state(torch.optim.AdamW([param, torch.nn.Parameter(torch.ones(1))]), old.state_dict(),
                                  "ck.pth")


def test_random_state_survives_weights_only_loading_and_continues_every_stream(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.normal()  # a cached gaussian is part of numpy's state
    torch.save({"rng": runs.rng_state()}, tmp_path / "rng.pth")
    expected = (random.random(), np.random.normal(), torch.rand(2))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    runs.set_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True)["rng"])
    again = (random.random(), np.random.normal(), torch.rand(2))
    assert again[:2] == expected[:2] and torch.equal(again[2], expected[2])


def test_save_training_state_adds_sampler_and_rng_and_never_saves_non_finite_weights(tmp_path):
    model = torch.nn.Linear(2, 2)
    path = tmp_path / "checkpoint.pth"
    runs.save_training_state(path, {"model": model.state_dict(), "epoch": 2}, next_epoch=3, position=64,
                             models={"model": model})
    saved = torch.load(path, weights_only=True)
    assert saved["sampler"] == {"epoch": 3, "position": 64} and checkpoint.resume_point(saved) == (3, 64)
    assert len(saved["rng"]) == 1 and set(saved["rng"][0]) >= {"python", "numpy", "torch"}
    good = path.read_bytes()
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(checkpoint.CheckpointError, match="not saved: the weights are no longer finite \\(model.weight"):
        runs.save_training_state(path, {"model": model.state_dict(), "epoch": 3}, 4, models={"model": model})
    assert path.read_bytes() == good


def test_cli_checks_name_the_flag():
    args = argparse.Namespace(epochs=0, lr=float("inf"), blr=None, save_every_iters=3, accum_iter=2)
    with pytest.raises(SystemExit, match="^error: --epochs must be greater than 0, got 0$"):
        cli.check_ranges(args, positive=["--epochs"])
    with pytest.raises(SystemExit, match="^error: --lr must be finite, got inf$"):
        cli.check_ranges(args, non_negative=["--lr", "--blr"])
    with pytest.raises(SystemExit, match="--save-every-iters 3 must be a multiple of --accum_iter 2"):
        cli.check_multiple(args, "--save-every-iters", "--accum_iter")
    with pytest.raises(SystemExit, match="--input-size 30 is not a multiple of the patch size 8; use 24 or 32"):
        cli.check_patch_grid(30, 8, "--input-size")
    cli.check_patch_grid(32, 8, "--input-size")


def test_argparse_errors_are_one_line_with_a_suggestion(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["main.py"])
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-size", type=int)
    cli.one_line_errors(parser)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--batchsize", "8"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("main.py: error: unrecognized arguments: --batchsize 8 (did you mean: "
                                       "--batchsize -> --batch-size?); see main.py --help\n")
