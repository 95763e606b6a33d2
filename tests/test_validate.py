"""validate.py and predict.py on tiny random models.

validate.py must reproduce the training scripts' `--eval` numbers on the same checkpoint (main.py for
Adventurer, Finetuning/main_finetune.py for ARM), on a folder of non-square images so that resize and crop
matter, with a last batch smaller than the others so that the loss averaging matters.
"""
import csv
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ImageNetInfo
from torchvision import transforms

import main
import models_arm
import predict
import validate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Finetuning"))
import main_finetune  # noqa: E402

ADVENTURER = ["--model", "adventurer_tiny_patch16", "--model-kwargs", "depth=2", "embed_dim=32"]
ARM_KWARGS = dict(patch_size=2, depth=2, embed_dim=16)
ARM = ["--model", "arm_base_pz16", "--model-kwargs", "patch_size=2", "depth=2", "embed_dim=16"]
COLUMNS = ["model", "checkpoint", "top1", "top1_err", "top5", "top5_err", "loss", "param_count", "img_size",
           "crop_pct", "crop_mode", "interpolation", "img_per_sec"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Three classes of non-square noise images: 2 train and 4 val images each (12 val: batches 5, 5, 2)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, count in (("train", 2), ("val", 4)):
        for label in range(3):
            (root / split / f"class_{label}").mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(40 * label, 130 + 40 * label, size=(50 + 9 * i, 70 - 5 * i, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / f"class_{label}" / f"{i}.png")
    return root


def run_validate(*argv):
    return validate.main(validate.get_args_parser().parse_args([*argv, "--device", "cpu", "-b", "5", "-j", "0"]))


def test_validate_rows_equal_main_eval(folder, tmp_path, capsys):
    torch.manual_seed(0)
    model = timm.create_model("adventurer_tiny_patch16", depth=2, embed_dim=32, img_size=48, num_classes=3)
    ema = {k: v * 0.5 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save({"model": model.state_dict(), "model_ema": ema, "epoch": 3}, tmp_path / "checkpoint.pth")
    save_file(ema, str(tmp_path / "ema.safetensors"))
    args = main.get_args_parser().parse_args(
        [*ADVENTURER, "--data-set", "FOLDER", "--data-path", str(folder), "--input-size", "48", "--batch-size", "5",
         "--device", "cpu", "--num_workers", "0", "--amp", "none", "--eval", "--resume",
         str(tmp_path / "checkpoint.pth")])
    stats = main.main(args)["stats"]
    assert "--eval-crop-ratio auto: 0.875 (no released checkpoint is adventurer_tiny_patch16 at 48 px)" in \
        capsys.readouterr().out

    results = tmp_path / "results.csv"
    rows = run_validate(*ADVENTURER, "--checkpoint", str(tmp_path / "checkpoint.pth"),
                        str(tmp_path / "ema.safetensors"), "--data-dir", str(folder), "--data-set", "FOLDER",
                        "--img-size", "48", "--results-file", str(results))
    for row, prefix in zip(rows, ("test", "ema_test")):
        for column, stat in (("top1", "acc1"), ("top5", "acc5"), ("loss", "loss")):
            assert row[column] == pytest.approx(stats[f"{prefix}_{stat}"], abs=1e-4), (prefix, column)
        assert (row["img_size"], row["crop_pct"], row["crop_mode"], row["interpolation"]) == (48, 0.875, "center",
                                                                                           "bicubic")
    assert rows[0]["loss"] != rows[1]["loss"]
    with open(results, newline="") as handle:
        written = list(csv.DictReader(handle))
    assert list(written[0]) == COLUMNS and len(written) == 2
    assert [float(r["top1"]) for r in written] == [r["top1"] for r in rows]
    assert written[1]["checkpoint"].endswith("ema.safetensors")


def test_validate_arm_matches_main_finetune_eval_with_the_cfg_pooling(folder, tmp_path):
    torch.manual_seed(0)
    model = models_arm.ARM(img_size=16, num_classes=3, global_pool=True, **ARM_KWARGS)
    torch.save({"model": model.state_dict()}, tmp_path / "arm.pth")
    args = main_finetune.get_args_parser().parse_args(
        [*ARM, "--global_pool", "--data-set", "FOLDER", "--data_path", str(folder), "--input_size", "16",
         "--batch_size", "5", "--device", "cpu", "--num_workers", "0", "--log_dir", "", "--amp", "none", "--eval",
         "--resume", str(tmp_path / "arm.pth")])
    expected = main_finetune.main(args)["test"]
    common = ["--checkpoint", str(tmp_path / "arm.pth"), "--data-dir", str(folder), "--data-set", "FOLDER",
              "--img-size", "16"]
    row, = run_validate(*ARM, *common)
    assert (row["top1"], row["loss"]) == (pytest.approx(expected["acc1"], abs=1e-4),
                                          pytest.approx(expected["loss"], abs=1e-4))
    assert (row["crop_pct"], row["crop_mode"]) == (0.875, "squash")
    token, = run_validate(*ARM, "global_pool=token", *common)
    assert token["loss"] != row["loss"]  # so the pooling the cfg applies is the one that matters


def test_predict_prints_the_top5_imagenet_classes(folder, tmp_path, capsys):
    torch.manual_seed(0)
    model = timm.create_model("adventurer_tiny_patch16", depth=1, embed_dim=32, img_size=32).eval()
    torch.save({"model": model.state_dict()}, tmp_path / "imagenet_head.pth")
    images = sorted(str(p) for p in (folder / "val" / "class_1").glob("*.png"))[:2]
    args = predict.get_args_parser().parse_args([*images, "--model", "adventurer_tiny_patch16", "--model-kwargs",
                                                 "depth=1", "embed_dim=32", "--img-size", "32", "--checkpoint",
                                                 str(tmp_path / "imagenet_head.pth"), "--device", "cpu"])
    results = predict.main(args)
    printed = capsys.readouterr().out.splitlines()

    official = transforms.Compose([transforms.Resize(36, interpolation=transforms.InterpolationMode.BICUBIC),
                                   transforms.CenterCrop(32), transforms.ToTensor(),
                                   transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
    with torch.no_grad():
        logits = model(torch.stack([official(Image.open(p).convert("RGB")) for p in images]))
    probabilities, indices = logits.softmax(-1).topk(5)
    info = ImageNetInfo()
    assert [path for path, _ in results] == images and len(printed) == 2 * 6
    for (path, classes), p, i in zip(results, probabilities, indices):
        assert [index for _, index, _ in classes] == i.tolist()
        assert [prob for prob, _, _ in classes] == pytest.approx(p.tolist(), abs=1e-5)
        best = classes[0][1]
        line = printed[printed.index(path) + 1]
        assert line.startswith("  1. ") and line.endswith(f"{info.index_to_label_name(best)}  "
                                                          f"{info.index_to_description(best)}")


def one_line_exit(call):
    with pytest.raises(SystemExit) as raised:
        call()
    message = str(raised.value)
    assert "\n" not in message
    return message


def test_bad_input_ends_with_one_line(folder, tmp_path):
    data = ["--data-dir", str(folder), "--data-set", "FOLDER"]
    assert "2 models and 3 checkpoints" in one_line_exit(lambda: run_validate(
        "--model", "a", "b", "--checkpoint", "x", "y", "z", *data))
    assert "unknown model 'adventurer_tiny_patch61'; close matches: adventurer_tiny_patch16" in one_line_exit(
        lambda: run_validate("--model", "adventurer_tiny_patch61", *data))
    assert "classify 1000 classes, the FOLDER data set has 3" in one_line_exit(
        lambda: run_validate("--model", "adventurer_tiny_patch16", "--pretrained", *data))
    assert "huggingface.co/OliverRen/ARM" in one_line_exit(
        lambda: run_validate("--model", "arm_base_pz16", "--pretrained", "--num-classes", "1000", *data))
    pretraining = models_arm.VisionMamba(img_size=16, dec_embed_dim=32, depth=4, patch_size=2, embed_dim=16)
    torch.save({"model": pretraining.state_dict()}, tmp_path / "checkpoint-0.pth")
    assert "pretraining checkpoint has no classifier" in one_line_exit(lambda: run_validate(
        *ARM, "--checkpoint", str(tmp_path / "checkpoint-0.pth"), "--img-size", "16", *data))
    torch.save({"model": timm.create_model("adventurer_tiny_patch16", depth=1, embed_dim=32).state_dict()},
               tmp_path / "adventurer.pth")
    image = str(next((folder / "val" / "class_0").glob("*.png")))
    mismatch = "cannot load weights from .* into Adventurer: .* missing keys"
    for path, checkpoint, message in ((str(tmp_path / "missing.png"), "adventurer.pth", "cannot read image"),
                                      (image, "checkpoint-0.pth", mismatch)):
        args = predict.get_args_parser().parse_args([path, "--model", "adventurer_tiny_patch16", "--model-kwargs",
                                                     "depth=1", "embed_dim=32", "--img-size", "32", "--checkpoint",
                                                     str(tmp_path / checkpoint), "--device", "cpu"])
        assert re.search(message, one_line_exit(lambda: predict.main(args)))
