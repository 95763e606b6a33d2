"""SIGKILL at random moments, then `--resume auto`, for the three training scripts: nothing is lost.

For each script an uninterrupted reference run logs every moment a kill can hit (an optimiser update, an
evaluation forward, a checkpoint write). Kill targets are drawn from them with a fixed seed, one third of
each kind (pretraining has no evaluation), and a chain of runs in one folder is killed at each target in
turn, every run started with `--resume auto`; the last one runs to the end. Checked for every chain:
* each run died by SIGKILL at its target, and a checkpoint write killed halfway left its temp file, which
  the next start removed (it was never resumed from);
* each resume lost at most one save interval of optimiser steps (`--save-every-iters`);
* every optimiser step of every run equals the reference's step of the same number: lr, loss and a SHA-1
  of all parameters after the update (so the loss and lr trajectory continue the interrupted one);
* log.txt has one row per epoch, no gaps, and the evaluation results of each row equal the reference's;
* the final checkpoint loads (safe loading) and its model, EMA and optimiser state equal the reference's.
What cannot be equal: `train_loss` / `train_lr` of an epoch resumed mid-way average only the iterations
trained after the resume, so the train_* columns of log.txt are not compared.

FAULTS_KILLS=N sets the kills per script (default 4; the README's figures come from FAULTS_KILLS=20).
"""
import json
import os
import random
import signal
from pathlib import Path

import pytest
import torch

from advarm import checkpoint

ROOT = Path(__file__).resolve().parents[2]
KILLS = int(os.environ.get("FAULTS_KILLS", "4"))
EPOCHS, ITERS, EVERY = (3 if KILLS <= 8 else 4), 6, 2
SCHEDULE = ["--epochs", str(EPOCHS), "--max-iters-per-epoch", str(ITERS), "--save-every-iters", str(EVERY),
            "--device", "cpu", "--amp", "none", "--data-set", "DIGITS", "--resume", "auto"]
SCRIPTS = {
    "main": (ROOT / "main.py", [
        "--model", "adventurer_tiny_patch16", "--model-kwargs", "depth=2", "embed_dim=32", "patch_size=8",
        "--input-size", "32", "--batch-size", "32", "--warmup-epochs", "1", "--lr", "2e-3", "--unscale-lr",
        "--model-ema-decay", "0.9", "--log-every", "100"], ("step", "eval", "save")),
    "main_pretrain": (ROOT / "main_pretrain.py", [
        "--model", "arm_base_pz16", "--model-kwargs", "img_size=16", "patch_size=2", "depth=4", "embed_dim=16",
        "dec_embed_dim=32", "--input_size", "16", "--batch_size", "32", "--warmup_epochs", "1", "--blr", "1e-2",
        "--save-every", "1", "--log_dir", ""], ("step", "save")),
    "main_finetune": (ROOT / "Finetuning" / "main_finetune.py", [
        "--model", "arm_base_pz16", "--model-kwargs", "patch_size=2", "depth=2", "embed_dim=16",
        "--input_size", "16", "--batch_size", "32", "--warmup_epochs", "1", "--blr", "5e-2", "--ema_decay", "0.9",
        "--global_pool", "--reprob", "0", "--save-every", "1", "--log_dir", ""], ("step", "eval", "save")),
}
REFERENCES = {}


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()] if Path(path).exists() else []


def steps_of(trace_path):
    """{global step: {lr, hash, loss}} of a trace."""
    steps = {}
    for record in read_jsonl(trace_path):
        steps.setdefault(record["step"], {}).update({k: v for k, v in record.items() if k != "step"})
    return steps


def argv_of(name, output_dir, workers):
    script, extra, _ = SCRIPTS[name]
    return script, [*extra, *SCHEDULE, "--num_workers", str(workers), "--output_dir", str(output_dir)]


def reference(zygote, name, tmp_path_factory):
    """The uninterrupted run (num_workers 0): its steps, kill-able moments, log and final checkpoint."""
    if name not in REFERENCES:
        folder = tmp_path_factory.mktemp(f"reference_{name}")
        script, argv = argv_of(name, folder / "run", 0)
        hooks = {"trace": str(folder / "trace"), "moments": str(folder / "moments")}
        rc, _, err = zygote.run(script, argv, folder, hooks=hooks)
        assert rc == 0, err[-3000:]
        REFERENCES[name] = dict(steps=steps_of(folder / "trace"), moments=read_jsonl(folder / "moments"),
                                log=read_jsonl(folder / "run" / "log.txt"),
                                final=checkpoint.load_checkpoint_file(latest(folder / "run")))
    return REFERENCES[name]


def latest(folder):
    return checkpoint.latest_checkpoint(folder)


def pick_targets(moments, count, kinds, seed):
    """`count` distinct moments, kinds in turn, in the order they happen."""
    rng = random.Random(seed)
    chosen = set()
    for i in range(count):
        pool = [j for j, m in enumerate(moments) if m["kind"] == kinds[i % len(kinds)] and j not in chosen]
        chosen.add(rng.choice(pool))
    return [moments[j] for j in sorted(chosen)]


def kill_chain(zygote, name, folder, workers, count, seed):
    """Kill a run at each target, resume with --resume auto each time; returns the runs' records."""
    _, _, kinds = SCRIPTS[name]
    ref = REFERENCES[name]
    targets = pick_targets(ref["moments"], count, kinds, seed)
    output_dir = folder / "run"
    runs = []
    for index, target in enumerate([*targets, None]):
        script, argv = argv_of(name, output_dir, workers)
        hooks = {"trace": str(folder / f"trace{index}"), "moments": str(folder / f"moments{index}"), "kill": target}
        rc, out, err = zygote.run(script, argv, folder, hooks=hooks)
        assert "Traceback" not in err, err[-3000:]
        assert rc == (-signal.SIGKILL if target else 0), (target, err[-3000:])
        temp_files = list(output_dir.glob(".*.tmp"))
        if target and target["kind"] == "save":  # killed halfway through a write: its temp file is left
            assert len(temp_files) == 1, temp_files
        else:
            assert not temp_files, temp_files
        runs.append(dict(target=target, out=out, steps=steps_of(folder / f"trace{index}"),
                         moments=read_jsonl(folder / f"moments{index}")))
    return output_dir, runs


def check_chain(name, output_dir, runs):
    ref = REFERENCES[name]
    total = EPOCHS * ITERS
    reached = 0
    for index, run in enumerate(runs):
        if not run["moments"]:  # the kill before hit the last save, after the final checkpoint was complete
            assert reached == total and "nothing to do" in run["out"], run["out"][-2000:]
            continue
        start = run["moments"][0]["step"]  # the global step the run resumed at
        assert 0 <= reached - start <= EVERY, f"run {index} resumed at step {start} after step {reached} was reached"
        end = run["moments"][-1]["step"]
        assert sorted(run["steps"]) == list(range(start + 1, end + 1))
        for step, record in run["steps"].items():
            assert record == ref["steps"][step], f"run {index}, step {step}: {record} != {ref['steps'][step]}"
        if index and runs[index - 1]["target"]["kind"] == "save":
            assert "temp file(s) of saves interrupted by a kill" in run["out"]
        reached = end
    assert reached == total
    rows = read_jsonl(output_dir / "log.txt")
    assert [row["epoch"] for row in rows] == list(range(EPOCHS))
    for row, ref_row in zip(rows, ref["log"]):
        assert {k: v for k, v in row.items() if "test_" in k} == {k: v for k, v in ref_row.items() if "test_" in k}
    final = checkpoint.load_checkpoint_file(latest(output_dir))
    assert checkpoint.resume_point(final) == (EPOCHS, 0)
    for entry in ("model", "model_ema"):
        if ref["final"].get(entry) is not None:
            for key, value in ref["final"][entry].items():
                assert torch.equal(final[entry][key], value), (entry, key)
    for param, state in ref["final"]["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(final["optimizer"]["state"][param][key], value), (param, key)


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_killed_runs_resume_and_end_equal_to_an_uninterrupted_run(name, zygote, figures, tmp_path, tmp_path_factory):
    reference(zygote, name, tmp_path_factory)
    figures["kills"] += KILLS
    output_dir, runs = kill_chain(zygote, name, tmp_path, workers=0, count=KILLS, seed=sorted(SCRIPTS).index(name))
    check_chain(name, output_dir, runs)
    figures["recovered"] += KILLS


def test_kills_with_dataloader_workers_end_equal_to_the_single_process_reference(zygote, figures, tmp_path,
                                                                                 tmp_path_factory):
    """Augmentations are seeded per sample (samplers.SeededSamples), so two worker processes that restart at
    every resume give the same steps as loading in the main process."""
    reference(zygote, "main", tmp_path_factory)
    count = max(KILLS // 2, 2)
    figures["kills"] += count
    output_dir, runs = kill_chain(zygote, "main", tmp_path, workers=2, count=count, seed=10)
    check_chain("main", output_dir, runs)
    figures["recovered"] += count
