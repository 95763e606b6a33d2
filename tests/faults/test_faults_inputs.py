"""The catalogue of bad inputs: what each of the three scripts does with them. The table is the documentation.

Every row is a situation a user can get into, the script it is tried on and the outcome: `error(pattern)`
(exit code != 0, exactly one line naming the problem, matching `pattern`, and no traceback on stderr) or
`runs(pattern)` (the run is legitimate: exit code 0, its output matching `pattern`), plus, where a promise
is about files, a check of the files. Rows run in-process (the script's `__main__` through runpy); the
rows where the process itself is the point (an unwritable folder, two runs at once) run as processes.
"""
import json
import re
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from advarm import checkpoint
from faults.faultkit import craft_checkpoint, output, run_in_process

ROOT = Path(__file__).resolve().parents[2]
MAIN, PRETRAIN, FINETUNE = ROOT / "main.py", ROOT / "main_pretrain.py", ROOT / "Finetuning" / "main_finetune.py"
COMMON = ["--device", "cpu", "--amp", "none", "--num_workers", "0", "--epochs", "1", "--max-iters-per-epoch", "2"]
MAIN_ARGS = ["--model", "adventurer_tiny_patch16", "--model-kwargs", "depth=2", "embed_dim=32", "patch_size=8",
             "--input-size", "32", "--batch-size", "64", "--log-every", "100", "--mixup", "0", "--cutmix", "0",
             "--aa", "", "--reprob", "0", "--warmup-epochs", "0", "--data-set", "DIGITS", *COMMON]
PRETRAIN_ARGS = ["--model", "arm_base_pz16", "--model-kwargs", "img_size=16", "patch_size=2", "depth=4",
                 "embed_dim=16", "dec_embed_dim=32", "--input_size", "16", "--batch_size", "32", "--log_dir", "",
                 "--warmup_epochs", "0", "--data-set", "DIGITS", *COMMON]
FINETUNE_ARGS = ["--model", "arm_base_pz16", "--model-kwargs", "patch_size=2", "depth=2", "embed_dim=16",
                 "--input_size", "16", "--batch_size", "64", "--log_dir", "", "--warmup_epochs", "0", "--reprob", "0",
                 "--global_pool", "--data-set", "DIGITS", *COMMON]
ARGS = {MAIN: MAIN_ARGS, PRETRAIN: PRETRAIN_ARGS, FINETUNE: FINETUNE_ARGS}

Row = namedtuple("Row", "situation script argv outcome check", defaults=(None,))


def error(pattern):
    return "error", pattern


def runs(pattern=""):
    return "runs", pattern


def flags(script, *extra):
    """The tiny configuration of `script` with `extra` flags (later flags win, as in argparse)."""
    return lambda c: [*ARGS[script], "--output_dir", c.out, *extra]


class Context:
    """Per-row paths plus the prepared runs and data every row may use (built once per module)."""

    def __init__(self, prepared, tmp):
        self.__dict__.update(prepared)
        self.tmp, self.out = tmp, tmp / "out"

    def file(self, name, data):
        path = self.tmp / name
        path.write_bytes(data)
        return path

    def truncated(self, source, name="truncated.pth"):
        return self.file(name, Path(source).read_bytes()[:-200])

    def run_copy(self, source):
        """A copy of a finished run's folder as this row's --output_dir."""
        shutil.copytree(source, self.out)
        return self.out

    def images(self, change=None):
        """A copy of the image folder, `change(root)` applied."""
        root = self.tmp / "images"
        shutil.copytree(self.image_folder, root)
        if change:
            change(root)
        return root

    def crafted(self, name="crafted.pth", kind="args"):
        return craft_checkpoint(self.tmp / name, self.marker, kind)


def folder_args(script, change=None, *extra):
    """The two-class image folder (16 train, 4 val images a class), batches of 8, `change` applied to it."""
    sep = "-" if script == MAIN else "_"
    return lambda c: [*ARGS[script], "--data-set", "FOLDER", f"--data{sep}path", c.images(change),
                      f"--batch{sep}size", "8", "--output_dir", c.out, *extra]


def corrupt(path):
    return lambda root: (root / path).write_bytes(b"\x89PNG\r\n\x1a\n not an image")


def empty_file(path):
    return lambda root: (root / path).write_bytes(b"")


def empty_val(root):
    for image in (root / "val").rglob("*.png"):
        image.unlink()


def drop_val_class(root):
    shutil.rmtree(root / "val" / "bright")


def unchanged(path_fn):
    """Check: the file the row starts from is left exactly as it was."""
    def check(c, result):
        path = path_fn(c)
        assert path.read_bytes() == c.originals[path], f"{path} was modified"
    return check


def restarts_from_the_good_checkpoint(c, result):
    unchanged(lambda c: c.out / "checkpoint.pth")(c, result)
    argv = [*MAIN_ARGS, "--output_dir", c.out, "--resume", "auto", "--epochs", "2"]
    code, out, _, message = run_in_process(MAIN, argv, c.tmp)
    assert code == 0, message
    assert "Resumed" in out and "at epoch 1" in out
    assert [json.loads(row)["epoch"] for row in (c.out / "log.txt").read_text().splitlines()] == [0, 1]


def moved_aside(c, result):
    (aside,) = c.out.glob("replaced-*")
    assert (aside / "checkpoint.pth").is_file() and (aside / "log.txt").is_file()
    assert [row for row in (c.out / "log.txt").read_text().splitlines()] and (c.out / "checkpoint.pth").is_file()


def new_lr_applied(c, result):
    groups = checkpoint.load_checkpoint_file(c.out / "checkpoint.pth")["optimizer"]["param_groups"]
    assert {g["initial_lr"] for g in groups} == {0.01}


def nothing_done(c, result):
    assert "Start training" not in result[1] and (c.out / "log.txt").read_text() == c.originals["log"]


def stale_files(c):
    c.out.mkdir()
    (c.out / ".checkpoint.pth.x1y2z3.tmp").write_bytes(b"half a save")
    (c.out / ".checkpoint--1.pth.abcdef.tmp").write_bytes(b"")
    (c.out / "run.lock").write_text("host gone, pid 999999999, since 2020-01-01 00:00:00")
    return [*PRETRAIN_ARGS, "--output_dir", c.out, "--resume", "auto"]


def no_temp_files(c, result):
    assert not list(c.out.glob(".*.tmp")) and not (c.out / "run.lock").exists()


def in_run_copy(source, *extra):
    def argv(c):
        c.run_copy(getattr(c, source))
        c.originals[c.out / "checkpoint.pth"] = (c.out / "checkpoint.pth").read_bytes()
        c.originals["log"] = (c.out / "log.txt").read_text()
        return [*ARGS[MAIN], "--output_dir", c.out, *extra]
    return argv


def with_checkpoint_file(make, name="checkpoint.pth", script=MAIN):
    """The row's --output_dir holds `make(c)` as `name`; the run resumes with --resume auto."""
    def argv(c):
        c.out.mkdir()
        shutil.copy(make(c), c.out / name)
        c.originals[c.out / name] = (c.out / name).read_bytes()
        return [*ARGS[script], "--output_dir", c.out, "--resume", "auto"]
    return argv


ROWS = [
    # ---- checkpoints
    Row("--resume of a file that does not exist", MAIN,
        lambda c: [*MAIN_ARGS, "--eval", "--resume", c.tmp / "nope.pth"], error(r"nope.pth: no such checkpoint file")),
    Row("--resume of an empty file", PRETRAIN, lambda c: [*PRETRAIN_ARGS, "--resume", c.file("empty.pth", b"")],
        error(r"empty.pth: empty file")),
    Row("--resume of a truncated checkpoint", FINETUNE,
        lambda c: [*FINETUNE_ARGS, "--output_dir", c.out, "--resume", c.truncated(c.finetune_ckpt)],
        error(r"truncated.pth: truncated or corrupt file")),
    Row("--resume of random bytes", MAIN, lambda c: [*MAIN_ARGS, "--resume", c.file("random.pth", np.random.default_rng(
        0).bytes(5000))], error(r"random.pth: not a torch checkpoint, or corrupt")),
    Row("--resume of another model's training checkpoint", MAIN,
        lambda c: [*MAIN_ARGS, "--output_dir", c.out, "--resume", c.finetune_ckpt],
        error(r"is a run of another model \(model 'arm_base_pz16' -> 'adventurer_tiny_patch16', input_size 16 -> 32")),
    Row("--eval of another model's weights", MAIN, lambda c: [*MAIN_ARGS, "--eval", "--resume", c.pretrain_ckpt],
        error(r"cannot load weights from .* into Adventurer: \d+ missing keys")),
    Row("--resume with another class count (other data)", MAIN,
        folder_args(MAIN, None, "--resume", "PLACEHOLDER"), error(r"another model \(nb_classes 10 -> 2\)")),
    Row("--resume at another resolution", MAIN, lambda c: [*MAIN_ARGS, "--input-size", "48", "--output_dir", c.out,
                                                          "--resume", c.main_ckpt],
        error(r"another model \(input_size 32 -> 48\)")),
    Row("--resume with another --model", MAIN, lambda c: [*MAIN_ARGS, "--model", "adventurer_small_patch16",
                                                         "--output_dir", c.out, "--resume", c.main_ckpt],
        error(r"another model \(model 'adventurer_tiny_patch16' -> 'adventurer_small_patch16'\)")),
    Row("--eval of a .safetensors file (weights only): legitimate", MAIN,
        lambda c: [*MAIN_ARGS, "--eval", "--resume", c.safetensors], runs(r"Accuracy of the network on the 360")),
    Row("--eval of a corrupt .safetensors file", FINETUNE,
        lambda c: [*FINETUNE_ARGS, "--eval", "--resume", c.file("bad.safetensors", b"\x08\x00\x00\x00garbage!")],
        error(r"bad.safetensors: not a readable safetensors file")),
    Row("--resume of a crafted pickle", PRETRAIN, lambda c: [*PRETRAIN_ARGS, "--resume", c.crafted()],
        error(r"crafted.pth: safe loading refuses posix.system .*trusted=True")),
    Row("--resume auto finds a truncated newest checkpoint", MAIN,
        with_checkpoint_file(lambda c: c.truncated(c.main_ckpt)),
        error(r"--resume auto: .*checkpoint.pth: truncated or corrupt file .*newest checkpoint.*move it away"),
        unchanged(lambda c: c.out / "checkpoint.pth")),
    Row("--resume auto finds a crafted newest checkpoint", FINETUNE,
        with_checkpoint_file(lambda c: c.crafted(), "checkpoint--1.pth", FINETUNE),
        error(r"--resume auto: .*checkpoint--1.pth: safe loading refuses"),
        unchanged(lambda c: c.out / "checkpoint--1.pth")),
    Row("--finetune from an ARM checkpoint", MAIN, lambda c: [*MAIN_ARGS, "--finetune", c.finetune_ckpt, "--eval"],
        error(r"finetune_run/checkpoint--1.pth: patch size \(2, 2\) differs from the model's \(8, 8\)")),
    Row("--finetune from a shallower model (layers would stay random)", MAIN,
        flags(MAIN, "--finetune", "MAIN_CKPT", "--eval", "--model-kwargs", "depth=3", "embed_dim=32", "patch_size=8"),
        error(r"not a checkpoint of this architecture; \d+ of the model's tensors are missing from it \(e.g. "
              r"layers.2")),
    Row("--finetune with another class count: legitimate (new head)", MAIN,
        folder_args(MAIN, None, "--finetune", "MAIN_CKPT", "--eval"), runs(r"Removing key head.weight")),
    Row("--finetune at another resolution: legitimate (position table resized)", MAIN,
        lambda c: [*MAIN_ARGS, "--finetune", c.main_ckpt, "--input-size", "48", "--eval"],
        runs(r"Resized pos_embed \(1, 17, 32\) -> \(1, 37, 32\)")),
    # ---- images and folders
    Row("a corrupt image in the training set", MAIN,
        folder_args(MAIN, corrupt("train/dark/0.png"), "--max-iters-per-epoch", "4"),  # the whole epoch
        error(r"cannot read image .*train/dark/0.png \(UnidentifiedImageError.*pass --bad-images skip")),
    Row("an empty (0-byte) image in the validation set", FINETUNE,
        folder_args(FINETUNE, empty_file("val/bright/1.png")), error(r"cannot read image .*val/bright/1.png")),
    Row("a corrupt image with --bad-images skip: legitimate", PRETRAIN,
        folder_args(PRETRAIN, corrupt("train/dark/0.png"), "--bad-images", "skip"), runs(r"Training time")),
    Row("--check-images finds a corrupt image before training", MAIN,
        folder_args(MAIN, corrupt("val/dark/2.png"), "--check-images"),
        error(r"--check-images: 1 of 8 validation images cannot be read: .*val/dark/2.png")),
    Row("--check-images with --bad-images skip: legitimate, counted", FINETUNE,
        folder_args(FINETUNE, corrupt("train/bright/3.png"), "--check-images", "--bad-images", "skip"),
        runs(r"--check-images: 1 unreadable training images \(skipped during training\)")),
    Row("a data folder that does not exist", MAIN,
        lambda c: [*MAIN_ARGS, "--data-set", "FOLDER", "--data-path", c.tmp / "nowhere"],
        error(r"data directory not found: .*nowhere")),
    Row("no val/ folder", FINETUNE, folder_args(FINETUNE, lambda root: shutil.rmtree(root / "val")),
        error(r"val directory not found")),
    Row("an empty validation set", MAIN, folder_args(MAIN, empty_val), error(r"val.*Found no valid file")),
    Row("a class missing from val/", FINETUNE, folder_args(FINETUNE, drop_val_class),
        error(r"hold different class folders \(e.g. \['bright'\]\)")),
    Row("a batch larger than the data set", PRETRAIN, folder_args(PRETRAIN, None, "--batch_size", "64"),
        error(r"--batch_size 64 is larger than the 32 training samples")),
    # ---- flags
    Row("an unknown model", MAIN, flags(MAIN, "--model", "adventurer_tiny_patch61"),
        error(r"unknown model 'adventurer_tiny_patch61'; close matches: adventurer_tiny_patch16")),
    Row("an unknown ARM model", PRETRAIN, flags(PRETRAIN, "--model", "arm_tiny"),
        error(r"--model arm_tiny: not an ARM model; valid names: arm_base_pz16")),
    Row("a misspelt flag", MAIN, flags(MAIN, "--lrr", "1e-3"),
        error(r"^main.py: error: unrecognized arguments: --lrr 1e-3 \(did you mean: --lrr -> --lr\?\); see main.py")),
    Row("a misspelt flag", FINETUNE, flags(FINETUNE, "--batchsize", "8"),
        error(r"unrecognized arguments: --batchsize 8 \(did you mean: --batchsize -> --batch_size\?\)")),
    Row("a misspelt model keyword", MAIN, flags(MAIN, "--model-kwargs", "dept=2"),
        error(r"cannot build adventurer_tiny_patch16: .*dept")),
    Row("an input size the patch size does not divide", MAIN, flags(MAIN, "--input-size", "30"),
        error(r"--input-size 30 is not a multiple of the patch size 8; use 24 or 32")),
    Row("an input size the patch size does not divide", FINETUNE, flags(FINETUNE, "--input_size", "15"),
        error(r"--input_size 15 is not a multiple of the patch size 2; use 14 or 16")),
    Row("a patch larger than the image", MAIN, flags(MAIN, "--input-size", "4"),
        error(r"--input-size 4 is not a multiple of the patch size 8; use 8")),
    Row("an input size that does not fit the pretraining model", PRETRAIN, flags(PRETRAIN, "--input_size", "24"),
        error(r"--input_size 24 does not match the model's img_size 16")),
    Row("--epochs 0", MAIN, flags(MAIN, "--epochs", "0"), error(r"--epochs must be greater than 0, got 0")),
    Row("--epochs 0", PRETRAIN, flags(PRETRAIN, "--epochs", "0"), error(r"--epochs must be greater than 0, got 0")),
    Row("--epochs -3", FINETUNE, flags(FINETUNE, "--epochs", "-3"), error(r"--epochs must be greater than 0, got -3")),
    Row("--batch-size 0", MAIN, flags(MAIN, "--batch-size", "0"), error(r"--batch-size must be greater than 0")),
    Row("--batch_size 0", FINETUNE, flags(FINETUNE, "--batch_size", "0"),
        error(r"--batch_size must be greater than 0")),
    Row("--input-size 0", MAIN, flags(MAIN, "--input-size", "0"), error(r"--input-size must be greater than 0")),
    Row("a negative --lr", MAIN, flags(MAIN, "--lr", "-0.001"), error(r"--lr must be 0 or more, got -0.001")),
    Row("a negative --blr", PRETRAIN, flags(PRETRAIN, "--blr", "-1"), error(r"--blr must be 0 or more, got -1.0")),
    Row("--lr 0: legitimate (nothing moves)", FINETUNE, flags(FINETUNE, "--lr", "0"), runs(r"actual lr: 0.00e\+00")),
    Row("a negative --save-every-iters", PRETRAIN, flags(PRETRAIN, "--save-every-iters", "-2"),
        error(r"--save-every-iters must be 0 or more, got -2")),
    Row("--save-every-iters not a multiple of --accum_iter", FINETUNE,
        flags(FINETUNE, "--save-every-iters", "3", "--accum_iter", "2"),
        error(r"--save-every-iters 3 must be a multiple of --accum_iter 2")),
    Row("--resume auto without --output_dir", PRETRAIN,
        lambda c: [*PRETRAIN_ARGS, "--output_dir", "", "--resume", "auto"],
        error(r"--resume auto looks for checkpoints in --output_dir; set --output_dir")),
    Row("--overwrite with --resume", MAIN, flags(MAIN, "--overwrite", "--resume", "auto"),
        error(r"--overwrite starts the run over and --resume continues it; pass only one")),
    # ---- run folders
    Row("a fresh run into another run's folder (--finetune from its own checkpoint)", MAIN,
        in_run_copy("main_run", "--finetune", "OUT_CKPT", "--save-every-iters", "1", "--lr", "30"),
        error(r"--output_dir .* already holds a run \(best_checkpoint.pth, checkpoint.pth, curves.png, log.txt\); "
              r"continue it with --resume auto, start over with --overwrite"),
        unchanged(lambda c: c.out / "checkpoint.pth")),
    Row("--overwrite into another run's folder: legitimate, its files moved aside", MAIN,
        in_run_copy("main_run", "--overwrite"), runs(r"--overwrite: moved the previous run's \d file\(s\) to"),
        moved_aside),
    Row("a changed --lr on --resume auto: applied and named", MAIN,
        in_run_copy("main_run", "--resume", "auto", "--epochs", "2", "--lr", "0.01", "--unscale-lr"),
        runs(r"note: resuming .* with flags that differ from its run: epochs 1 -> 2, lr 6.25e-05 -> 0.01, "
             r"unscale_lr False -> True \(the new values apply\)"), new_lr_applied),
    Row("a diverging run (NaN loss): stops, the good checkpoint stays, a resume restarts from it", MAIN,
        in_run_copy("main_run", "--resume", "auto", "--epochs", "2", "--lr", "1e30", "--unscale-lr"),
        error(r"loss is nan at epoch 1, iteration 1: stopping training; the checkpoints keep the last good weights"),
        restarts_from_the_good_checkpoint),
    Row("--resume auto of a finished run: legitimate, nothing to do", MAIN, in_run_copy("main_run", "--resume", "auto"),
        runs(r"the run has already trained its 1 epochs; nothing to do"), nothing_done),
    Row("a lock and temp files left by a killed run: taken over and removed", PRETRAIN, stale_files,
        runs(r"(?s)was left by a run that no longer runs \(host gone.*removed 2 temp file"), no_temp_files),
]


def _resolve(argv, c):
    """Placeholders of rows whose paths exist only once the row runs."""
    names = {"PLACEHOLDER": c.main_ckpt, "MAIN_CKPT": c.main_ckpt, "OUT_CKPT": c.out / "checkpoint.pth"}
    return [str(names.get(a, a)) for a in argv]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Small runs of each script (their checkpoints are the rows' material) and a two-class image folder."""
    base = tmp_path_factory.mktemp("prepared")
    rng = np.random.default_rng(0)
    images = base / "images"
    for split, count in (("train", 16), ("val", 4)):
        for label, (low, high) in {"bright": (150, 256), "dark": (0, 100)}.items():
            (images / split / label).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(low, high, (32, 32, 3), dtype=np.uint8)).save(
                    images / split / label / f"{i}.png")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for script, name in ((MAIN, "main_run"), (PRETRAIN, "pretrain_run"), (FINETUNE, "finetune_run")):
        code, _, _, message = run_in_process(script, [*ARGS[script], "--output_dir", base / name], base)
        assert code == 0, message
    torch.set_num_threads(threads)
    safetensors = base / "model.safetensors"
    checkpoint.save_checkpoint(checkpoint.load_checkpoint_file(base / "main_run" / "checkpoint.pth")["model"],
                               safetensors)
    return dict(image_folder=images, main_run=base / "main_run", main_ckpt=base / "main_run" / "checkpoint.pth",
                pretrain_ckpt=base / "pretrain_run" / "checkpoint-0.pth",
                finetune_ckpt=base / "finetune_run" / "checkpoint--1.pth", safetensors=safetensors)


def one_line(result):
    """The line the user sees for a failed run: the SystemExit message, or argparse's line on stderr."""
    code, out, err, message = result
    return message if message else (err.strip().splitlines() or [""])[-1]


@pytest.mark.parametrize("row", ROWS, ids=[f"{r.script.stem}: {r.situation}" for r in ROWS])
def test_bad_input(row, prepared, tmp_path, figures):
    figures["inputs"] += 1
    c = Context(dict(prepared, marker=tmp_path / "marker", originals={}), tmp_path)
    argv = _resolve(row.argv(c), c)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_in_process(row.script, argv, tmp_path)
    finally:
        torch.set_num_threads(threads)
    code, out, err, message = result
    assert not message.startswith("TRACEBACK"), message
    assert "Traceback" not in err, err[-3000:]
    kind, pattern = row.outcome
    if kind == "error":
        line = one_line(result)
        assert code != 0, out[-2000:]
        assert "\n" not in line.strip() and re.search(pattern, line), line
    else:
        assert code == 0, one_line(result)
        assert re.search(pattern, out), out[-3000:]
    if row.check:
        row.check(c, result)
    assert not c.marker.exists()
    figures["clear"] += 1


# ---------------------------------------------------------------------------------------------------
# rows where the process is the point


@pytest.mark.parametrize("script", [MAIN, PRETRAIN, FINETUNE], ids=lambda s: s.stem)
def test_unwritable_output_dir_ends_with_one_line_from_the_real_interpreter(script, tmp_path, figures):
    """A path through a regular file cannot be created even by root; a real `python script.py` process."""
    figures["inputs"] += 1
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    done = subprocess.run([sys.executable, str(script), *ARGS[script], "--output_dir", str(blocker / "out")],
                          cwd=script.parent, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)})
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert len(lines) == 1 and re.search(r"^error: --output_dir .*a_file/out cannot be used \(Not a directory\)$",
                                         lines[0]), lines
    figures["clear"] += 1


def test_two_runs_on_one_output_dir_one_stops_with_the_holder_named(zygote, tmp_path, figures):
    figures["inputs"] += 1
    out = tmp_path / "out"
    argv = [*MAIN_ARGS, "--epochs", "2", "--output_dir", out]
    first = zygote.start(MAIN, argv, tmp_path)
    second = zygote.start(MAIN, argv, tmp_path)
    codes = {first: zygote.wait(first), second: zygote.wait(second)}
    (winner,) = [pid for pid, code in codes.items() if code == 0]
    (loser,) = [pid for pid, code in codes.items() if code != 0]
    err = output(tmp_path, loser)[1]
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert re.search(rf"--output_dir {out} is in use by another run \(host \S+, pid {winner}, since ", err), err
    rows = (out / "log.txt").read_text().splitlines()
    assert [json.loads(row)["epoch"] for row in rows] == [0, 1]  # one run's rows, not interleaved
    assert not (out / "run.lock").exists()
    figures["clear"] += 1
