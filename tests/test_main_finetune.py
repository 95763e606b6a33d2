"""Finetuning/main_finetune.py: official command lines, pretrain -> finetune, EMA, --eval, resume, fixed defects."""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import main_pretrain
import models_arm
from advarm import checkpoint

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Finetuning"))
import main_finetune  # noqa: E402

# The two finetuning commands of the official ARM README, verbatim (after its `cd Finetuning`).
README_FINETUNE = [
    """torchrun --standalone --nproc_per_node 8 main_finetune.py --batch_size 128 \\
    --model arm_base_pz16 --finetune ./checkpoint-1599.pth \\
    --epochs 100 --global_pool True \\
    --blr 5e-4 --layer_decay 0.65 --ema_decay 0.99992 \\
    --weight_decay 0.05 --drop_path 0.1 --reprob 0.25 --mixup 0.8 --cutmix 1.0 \\
    --dist_eval --data_path /path/to/ImageNet --output_dir ./out_finetune_b/""",
    """torchrun --standalone --nproc_per_node 8 main_finetune.py --batch_size 32 --accum_iter 4 \\
      --model arm_large_pz16 --finetune ./checkpoint-1599.pth\\
      --epochs 100 --global_pool True  --ema_decay 0.99992 \\
      --blr 5e-4 --layer_decay 0.75 \\
      --weight_decay 0.05 --drop_path 0.3 --reprob 0.25 --mixup 0.8 --cutmix 1.0 \\
      --dist_eval --data_path /data1/data/ImageNet --output_dir ./out_finetune_l/""",
]

MODEL = ["--model", "arm_base_pz16", "--model-kwargs", "patch_size=2", "depth=4", "embed_dim=16"]
COMMON = ["--device", "cpu", "--input_size", "16", "--batch_size", "8", "--num_workers", "0", "--log_dir", "",
          "--warmup_epochs", "1", "--blr", "0.05"]


def script_args(command):
    """The arguments after the script name of a shell command line (bash drops backslash-newlines)."""
    words = shlex.split(command.replace("\\\n", ""))
    return words[next(i for i, w in enumerate(words) if w.endswith(".py")) + 1:]


def parse(argv):
    return main_finetune.get_args_parser().parse_args(argv)


def log_rows(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "log.txt").read_text().splitlines()]


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory):
    """Two classes (bright / dark noise images), 16 train and 4 val images each."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for split, count in (("train", 16), ("val", 4)):
        for label, (low, high) in {"bright": (150, 256), "dark": (0, 100)}.items():
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(low, high, size=(16, 16, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def pretrain_checkpoint(tmp_path_factory):
    """A pretraining checkpoint written by main_pretrain.py (same encoder configuration as MODEL)."""
    out = tmp_path_factory.mktemp("pretrain")
    argv = ["--device", "cpu", "--data-set", "DIGITS", "--input_size", "16", "--batch_size", "8", "--num_workers",
            "0", "--log_dir", "", "--epochs", "1", "--max-iters-per-epoch", "2", "--output_dir", str(out),
            "--model-kwargs", "img_size=16", "patch_size=2", "depth=4", "embed_dim=16", "dec_embed_dim=32"]
    main_pretrain.main(main_pretrain.get_args_parser().parse_args(argv))
    return out / "checkpoint-0.pth"


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, folder_data, pretrain_checkpoint):
    """Two finetuning epochs from the pretraining checkpoint with EMA and mixup/cutmix."""
    out = tmp_path_factory.mktemp("finetune")
    argv = COMMON + MODEL + ["--data-set", "FOLDER", "--data_path", str(folder_data), "--finetune",
                             str(pretrain_checkpoint), "--epochs", "2", "--ema_decay", "0.9", "--global_pool",
                             "--mixup", "0.8", "--cutmix", "1.0", "--output_dir", str(out)]
    stats = main_finetune.main(parse(argv))
    return out, stats


@pytest.mark.parametrize("command", README_FINETUNE, ids=["base", "large"])
def test_readme_commands_parse(command):
    args = parse(script_args(command))
    assert args.model in ("arm_base_pz16", "arm_large_pz16") and args.finetune == "./checkpoint-1599.pth"
    assert args.global_pool is True and args.ema_decay == 0.99992 and args.dist_eval
    assert (args.epochs, args.blr, args.weight_decay, args.reprob, args.mixup, args.cutmix) == (
        100, 5e-4, 0.05, 0.25, 0.8, 1.0)
    assert (args.batch_size, args.accum_iter, args.layer_decay, args.drop_path) in (
        (128, 1, 0.65, 0.1), (32, 4, 0.75, 0.3))
    # Untouched official defaults.
    assert (args.input_size, args.min_lr, args.warmup_epochs, args.smoothing, args.nb_classes) == (
        224, 1e-6, 5, 0.1, 1000)
    assert args.aa == "rand-m9-mstd0.5-inc1" and args.clip_grad is None and args.eval_resize == "square"


@pytest.mark.parametrize("argv, expected", [
    ([], None), (["--global_pool"], True), (["--global_pool", "True"], True), (["--global_pool", "avg"], True),
    (["--global_pool", "False"], False), (["--global_pool", "0"], False), (["--global_pool", "no"], False),
    (["--cls_token"], False), (["--global_pool", "--ema_decay", "0.9"], True),
])
def test_global_pool_reads_the_word(argv, expected):
    assert parse(argv).global_pool is expected


def test_global_pool_rejects_unknown_words():
    with pytest.raises(SystemExit):
        parse(["--global_pool", "maybe"])


@pytest.mark.parametrize("flag", ["--local_rank=2", "--local-rank=2"])
def test_both_local_rank_spellings(flag):
    assert parse([flag]).local_rank == 2


def test_default_model_error_lists_valid_names(folder_data):
    args = parse(COMMON + ["--data-set", "FOLDER", "--data_path", str(folder_data), "--output_dir", ""])
    with pytest.raises(SystemExit, match="vit_large_patch16.*arm_base_pz16"):
        main_finetune.main(args)


def test_pretrain_weights_are_transferred(pretrain_checkpoint):
    model = models_arm.create_finetune_model("arm_base_pz16", patch_size=2, depth=4, embed_dim=16,
                                             img_size=24, num_classes=3)
    main_finetune.load_finetune_weights(model, pretrain_checkpoint)
    source = checkpoint.load_checkpoint_file(pretrain_checkpoint)["model"]
    assert torch.equal(model.patch_embed.proj.weight, source["patch_embed.proj.weight"])
    assert torch.equal(model.layers[1].mixer.A_c_b_log, source["layers.1.mixer.A_log"])
    assert model.pos_embed.shape == (1, 145, 16)  # 8x8 table resized to 12x12, zero cls row in the middle
    assert torch.count_nonzero(model.pos_embed[0, 72]) == 0
    assert model.head.weight.std() < 1e-4  # official head re-init, std 2e-5


def test_finetuned_checkpoint_loads_at_another_size(finetuned):
    out, _ = finetuned
    source = checkpoint.load_checkpoint_file(out / "checkpoint-1.pth")["model"]
    model = models_arm.create_finetune_model("arm_base_pz16", patch_size=2, depth=4, embed_dim=16,
                                             img_size=24, num_classes=5)
    main_finetune.load_finetune_weights(model, out / "checkpoint-1.pth")
    assert model.pos_embed.shape == (1, 145, 16)
    assert torch.equal(model.pos_embed[0, 72], source["pos_embed"][0, 32])  # cls slot kept, no second one
    assert torch.equal(model.layers[0].mixer.A_b_log, source["layers.0.mixer.A_b_log"])


def test_finetune_trains_evaluates_and_checkpoints(finetuned):
    out, stats = finetuned
    rows = log_rows(out)
    assert [row["epoch"] for row in rows] == [0, 1]
    for key in ("train_loss", "train_lr", "test_acc1", "test_loss", "ema_test_acc1", "ema_test_acc5", "n_parameters"):
        assert key in rows[-1]
    assert stats == rows[-1]
    saved = checkpoint.load_checkpoint_file(out / "checkpoint-1.pth")
    assert saved["model"]["head.weight"].shape == (2, 16)  # class count taken from the FOLDER data
    assert saved["model_ema"] is not None and saved["epoch"] == 1
    assert saved["max_accuracy"] == max(row["test_acc1"] for row in rows)
    for best in ("checkpoint--10.pth", "checkpoint--20.pth"):
        assert checkpoint.load_checkpoint_file(out / best)["epoch"] in (0, 1)  # real epochs, not -10 / -20
    assert checkpoint.load_checkpoint_file(out / "checkpoint--1.pth")["epoch"] == 1  # rolling, every epoch
    assert checkpoint.latest_checkpoint(out).name in ("checkpoint--1.pth", "checkpoint-1.pth")
    groups = saved["optimizer"]["param_groups"]
    assert max(g["lr_scale"] for g in groups) == 1.0 and min(g["lr_scale"] for g in groups) == pytest.approx(0.75 ** 5)


def test_eval_uses_resume_and_evaluates_the_ema(finetuned, folder_data):
    out, stats = finetuned
    argv = COMMON + MODEL + ["--data-set", "FOLDER", "--data_path", str(folder_data), "--eval", "--resume",
                             str(out / "checkpoint-1.pth"), "--global_pool", "--output_dir", ""]
    results = main_finetune.main(parse(argv))
    assert results["test"]["acc1"] == pytest.approx(stats["test_acc1"])
    assert results["ema_test"]["acc1"] == pytest.approx(stats["ema_test_acc1"])
    with pytest.raises(SystemExit, match="--eval needs --resume"):
        main_finetune.main(parse(argv[:argv.index("--resume")] + ["--output_dir", ""]))


def test_no_ema_by_default_and_official_epoch_fields(tmp_path, folder_data, pretrain_checkpoint):
    argv = COMMON + MODEL + ["--data-set", "FOLDER", "--data_path", str(folder_data), "--finetune",
                             str(pretrain_checkpoint), "--epochs", "1", "--official-epoch-fields",
                             "--output_dir", str(tmp_path)]
    stats = main_finetune.main(parse(argv))
    assert "test_acc1" in stats and not any(k.startswith("ema_") for k in stats)
    assert not (tmp_path / "checkpoint--20.pth").exists()
    best = checkpoint.load_checkpoint_file(tmp_path / "checkpoint--10.pth")
    assert best["epoch"] == -10 and best["model_ema"] is None


def test_resume_without_accuracy_fields(tmp_path, finetuned, folder_data):
    out, _ = finetuned
    old = checkpoint.load_checkpoint_file(out / "checkpoint-1.pth")
    del old["max_accuracy"], old["ema_max_accuracy"]
    torch.save(old, tmp_path / "old.pth")
    argv = COMMON + MODEL + ["--data-set", "FOLDER", "--data_path", str(folder_data), "--epochs", "3",
                             "--ema_decay", "0.9", "--global_pool", "--resume", str(tmp_path / "old.pth"),
                             "--output_dir", str(tmp_path)]
    stats = main_finetune.main(parse(argv))
    assert stats["epoch"] == 2 and [row["epoch"] for row in log_rows(tmp_path)] == [2]
    saved = checkpoint.load_checkpoint_file(tmp_path / "checkpoint-2.pth")
    assert saved["max_accuracy"] == stats["test_acc1"]  # counted from 0, not from a missing value
    step = {float(s["step"]) for s in saved["optimizer"]["state"].values()}
    assert step == {float(2 * 4 + 4)}  # 2 epochs x 4 iterations restored + 4 new


def test_two_process_gloo_run_stays_in_sync(tmp_path, folder_data, pretrain_checkpoint):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "main_finetune.py",
         *COMMON, *MODEL, "--data-set", "FOLDER", "--data_path", str(folder_data), "--finetune",
         str(pretrain_checkpoint), "--epochs", "1", "--ema_decay", "0.9", "--dist_eval", "--output_dir", str(tmp_path)],
        cwd=ROOT / "Finetuning", env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for what in ("parameter", "EMA parameter"):  # the EMA too: it starts from DDP's broadcast weights
        line = next(line for line in result.stdout.splitlines() if line.startswith(f"{what} checksum per rank"))
        values = json.loads(line.split(": ", 1)[1].split(" (")[0])
        assert len(values) == 2 and values[0] == values[1] and "in sync" in line
    assert "ema_test_acc1" in log_rows(tmp_path)[0]
