"""Crafted checkpoints never run code: every route that opens a checkpoint, by default, refuses them.

Each crafted file (faultkit.craft_checkpoint) creates a marker file when unpickled without restrictions;
the first test proves that it does (so the files really are attacks). Every loading route then gets them:
the three scripts' --resume, --resume auto, --eval and --finetune, validate.py and predict.py
--checkpoint, `models_arm.py convert`, the library's loaders, and timm's create_model with the project's
pretrained cfgs and with checkpoint_path.
Each must refuse with a message that says how to load a file one trusts, and the marker must not exist.
"""
import re
import warnings
from pathlib import Path

import pytest
import timm
import torch

import inference
import models_adventurer  # noqa: F401  (registers the models in timm)
import models_arm
from advarm import checkpoint
from faults.faultkit import CRAFTED_KINDS, craft_checkpoint, run_in_process

ROOT = Path(__file__).resolve().parents[2]
MAIN, PRETRAIN, FINETUNE = ROOT / "main.py", ROOT / "main_pretrain.py", ROOT / "Finetuning" / "main_finetune.py"
VALIDATE, PREDICT = ROOT / "validate.py", ROOT / "predict.py"
TINY = {
    MAIN: ["--model", "adventurer_tiny_patch16", "--model-kwargs", "depth=2", "embed_dim=32", "patch_size=8",
           "--input-size", "32", "--batch-size", "64", "--data-set", "DIGITS"],
    PRETRAIN: ["--model", "arm_base_pz16", "--model-kwargs", "img_size=16", "patch_size=2", "depth=4", "embed_dim=16",
               "dec_embed_dim=32", "--input_size", "16", "--batch_size", "32", "--log_dir", "", "--data-set", "DIGITS"],
    FINETUNE: ["--model", "arm_base_pz16", "--model-kwargs", "patch_size=2", "depth=2", "embed_dim=16",
               "--input_size", "16", "--batch_size", "64", "--log_dir", "", "--data-set", "DIGITS"],
    VALIDATE: ["--model", "adventurer_tiny_patch16", "--model-kwargs", "depth=2", "embed_dim=32", "--data-set",
               "DIGITS", "--data-dir", ".", "--device", "cpu"],
    PREDICT: ["digit.png", "--model", "adventurer_tiny_patch16", "--model-kwargs", "depth=2", "embed_dim=32",
              "--device", "cpu"],
}
COMMON = ["--device", "cpu", "--amp", "none", "--num_workers", "0", "--epochs", "1", "--max-iters-per-epoch", "1"]
PAYLOADS = ("os.system", "builtins.exec", "pathlib.Path.touch")
OUR_HINT = r"safe loading refuses \S+ \(unpickling it could run code\); if you trust the file's source, load it in " \
           r"Python with advarm.checkpoint.load_checkpoint_file\(path, trusted=True\)"
TIMM_HINT = r"If this checkpoint is trusted, retry with weights_only=False"

# (route, how the crafted file is handed to it): argv after the tiny flags, {} = the file, {out} = --output_dir
CLI_ROUTES = [
    (MAIN, "--resume {}"), (MAIN, "--eval --resume {}"), (MAIN, "--finetune {}"), (MAIN, "--resume auto"),
    (PRETRAIN, "--resume {}"), (PRETRAIN, "--resume auto"),
    (FINETUNE, "--resume {}"), (FINETUNE, "--eval --resume {}"), (FINETUNE, "--finetune {}"),
    (FINETUNE, "--resume auto"), (VALIDATE, "--checkpoint {}"), (PREDICT, "--checkpoint {}"),
]
AUTO_NAME = {MAIN: "checkpoint.pth", PRETRAIN: "checkpoint--1.pth", FINETUNE: "checkpoint--1.pth"}


def test_the_crafted_files_do_run_code_when_loaded_as_trusted(tmp_path):
    for kind in CRAFTED_KINDS:
        for payload in PAYLOADS:
            marker = tmp_path / f"marker_{kind}_{payload}"
            path = craft_checkpoint(tmp_path / "crafted.pth", marker, kind, payload)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    checkpoint.load_checkpoint_file(path, trusted=True)
                except checkpoint.CheckpointError:  # "top" unpickles to the payload's return value, not a dict
                    pass
            assert marker.exists(), (kind, payload)


@pytest.mark.parametrize("script, how", CLI_ROUTES, ids=[f"{s.stem} {h}" for s, h in CLI_ROUTES])
@pytest.mark.parametrize("kind", ["args", "legacy"])
def test_script_routes_refuse_crafted_checkpoints(script, how, kind, tmp_path, figures):
    marker = tmp_path / "marker"
    out = tmp_path / "out"
    crafted = craft_checkpoint(tmp_path / "crafted.pth", marker, kind)
    if how == "--resume auto":
        out.mkdir()
        crafted.rename(out / AUTO_NAME[script])
    training = script in (MAIN, PRETRAIN, FINETUNE)
    argv = [*TINY[script], *(COMMON + ["--output_dir", out] if training else []), *how.format(crafted).split()]
    figures["loads"] += 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, _, err, message = run_in_process(script, argv, tmp_path)
    finally:
        torch.set_num_threads(threads)
    figures["executions"] += marker.exists()
    assert not marker.exists()
    assert code == 1 and "Traceback" not in err and "\n" not in message, message
    assert re.search(OUR_HINT, message), message


def _library_routes(path, folder):
    """Every library entry point that opens a checkpoint file, each a callable that must refuse `path`."""
    def tiny_adventurer(**kwargs):
        return timm.create_model("adventurer_tiny_patch16", depth=2, embed_dim=32, num_classes=10, **kwargs)

    def arm(**kwargs):
        return timm.create_model("arm_base_pz16", depth=2, embed_dim=16, patch_size=2, num_classes=10, **kwargs)

    return {
        "checkpoint.load_checkpoint_file": (lambda: checkpoint.load_checkpoint_file(path), OUR_HINT),
        "checkpoint.load_checkpoint_container": (lambda: checkpoint.load_checkpoint_container(path), OUR_HINT),
        "checkpoint.load_weights": (lambda: checkpoint.load_weights(torch.nn.Linear(2, 2), path), OUR_HINT),
        "checkpoint.resolve_resume('auto')": (lambda: checkpoint.resolve_resume("auto", folder), OUR_HINT),
        "Adventurer.load_pretrained": (lambda: tiny_adventurer().load_pretrained(path), OUR_HINT),
        "timm.create_model(adventurer, pretrained=True, file=...)": (
            lambda: tiny_adventurer(pretrained=True, pretrained_cfg_overlay=dict(file=str(path))), OUR_HINT),
        "timm.create_model(adventurer, checkpoint_path=...)": (
            lambda: tiny_adventurer(checkpoint_path=str(path)), TIMM_HINT),
        "timm.create_model(arm, pretrained=True, file=...)": (
            lambda: arm(pretrained=True, pretrained_cfg_overlay=dict(file=str(path))), TIMM_HINT),
        "models_arm.py convert": (lambda: models_arm.main(["convert", str(path), str(folder / "out.pth")]), OUR_HINT),
        "inference.create_classifier (validate.py, predict.py)": (
            lambda: inference.create_classifier("adventurer_tiny_patch16", str(path), depth=2, embed_dim=32), OUR_HINT),
    }


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("kind", CRAFTED_KINDS)
def test_library_routes_refuse_crafted_checkpoints(kind, payload, tmp_path, figures):
    marker = tmp_path / "marker"
    path = craft_checkpoint(tmp_path / "checkpoint.pth", marker, kind, payload)
    assert checkpoint.latest_checkpoint(tmp_path) is None  # never a resume candidate
    for route, (load, hint) in _library_routes(path, tmp_path).items():
        figures["loads"] += 1
        with pytest.raises((Exception, SystemExit)) as refused:  # each route has its own error type
            load()
        figures["executions"] += marker.exists()
        assert not marker.exists(), route
        assert re.search(hint, str(refused.value)), (route, str(refused.value)[:500])
