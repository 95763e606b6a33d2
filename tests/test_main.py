"""main.py end to end on CPU: tiny Adventurer (depth 2, width 32, 32 px) on a generated image folder."""
import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import inference
import main
from advarm import checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "adventurer_tiny_patch16", "--model-kwargs", "depth=2", "embed_dim=32",
        "--input-size", "32", "--batch-size", "8", "--device", "cpu", "--num_workers", "0", "--log-every", "50",
        "--reprob", "0", "--aa", ""]

# The official README commands, verbatim (github.com/wangf3014/Adventurer, README.md).
README_EVAL = """python -m torch.distributed.launch --nproc_per_node=1  --use_env main.py \\
    --model adventurer_base_patch16 --input-szie 224 \\
    --data-path /PATH/TO/IMAGENET --batch 128 \\
    --resume /PATH/TO/CHECKPOINT \\
    --eval --eval-crop-ratio 0.875"""
README_STAGES = [
    """python -m torch.distributed.launch --nproc_per_node=8  --use_env main.py \\
    --model adventurer_base_patch16 \\
    --data-path /PATH/TO/IMAGENET \\
    --batch 128 --lr 5e-4 --weight-decay 0.05 \\
    --output_dir ./output/adventurer_base_patch16_224/s1_128 \\
    --reprob 0.0 --smoothing 0.0  --repeated-aug --ThreeAugment \\
    --epochs 300 --input-size 128 --drop-path 0.1 --dist-eval""",
    # stages 2 and 3 lack the backslash after --finetune in the README; this is the intended command
    """python -m torch.distributed.launch --nproc_per_node=8  --use_env main.py \\
    --model adventurer_base_patch16 \\
    --data-path /PATH/TO/IMAGENET \\
    --batch 128 --lr 5e-4 --weight-decay 0.05 \\
    --finetune ./output/adventurer_base_patch16_224/s1_128/checkpoint.pth
    --output_dir ./output/adventurer_base_patch16_224/s2_224 \\
    --reprob 0.0 --smoothing 0.0  --repeated-aug --ThreeAugment \\
    --epochs 100 --input-size 224 --drop-path 0.4 --dist-eval""",
    """python -m torch.distributed.launch --nproc_per_node=8  --use_env main.py \\
    --model adventurer_base_patch16 \\
    --data-path /PATH/TO/IMAGENET \\
    --batch 64 --lr 1e-5 --weight-decay 0.1 --unscale-lr \\
    --finetune ./output/adventurer_base_patch16_224/s2_224/checkpoint.pth
    --output_dir ./output/adventurer_base_patch16_224/s3_224 \\
    --reprob 0.0 --smoothing 0.1 --no-repeated-aug --aa rand-m9-mstd0.5-inc1 \\
    --epochs 20 --input-size 224 --drop-path 0.6 --dist-eval""",
]


def _script_args(command):
    """The arguments after main.py of a README command (line continuations joined)."""
    words = shlex.split(command.replace("\\\n", " ").replace("\n", " "))
    return words[words.index("main.py") + 1:]


def parse(argv):
    return main.get_args_parser().parse_args(argv)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two learnable classes (dark vs bright noise), 16 train and 4 val images each, 32x32 PNG."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for split, count in (("train", 16), ("val", 4)):
        for label, (low, high) in enumerate(((0, 120), (135, 255))):
            directory = root / split / f"class_{label}"
            directory.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(low, high, size=(32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(directory / f"{i}.png")
    return root


def run_main(folder, *extra):
    return main.main(parse(["--data-set", "FOLDER", "--data-path", str(folder), *TINY, *extra]))


def read_log(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "log.txt").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    """One epoch of two iterations with EMA, checkpoints and log.txt."""
    output_dir = tmp_path_factory.mktemp("trained")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    result = run_main(folder, "--epochs", "1", "--max-iters-per-epoch", "2", "--output_dir", str(output_dir),
                      "--model-ema-decay", "0.5")
    torch.set_num_threads(threads)
    return output_dir, result


# ---------------------------------------------------------------------------------------------------
# command line


SPEC_DEFAULTS = dict(
    batch_size=64, epochs=300, bce_loss=False, unscale_lr=False, accum_iter=1, model="adventurer_base_patch16_224",
    input_size=224, drop=0.0, drop_path=0.1, model_ema=True, model_ema_decay=0.99996, model_ema_force_cpu=False,
    load_ema=False, opt="adamw", opt_eps=1e-8, opt_betas=(0.9, 0.999), clip_grad=None, momentum=0.9,
    weight_decay=0.05, sched="cosine", lr=5e-4, lr_noise=None, lr_noise_pct=0.67, lr_noise_std=1.0,
    warmup_lr=1e-6, min_lr=1e-5, layer_decay=1.0, decay_epochs=30, warmup_epochs=5, cooldown_epochs=10,
    patience_epochs=10, decay_rate=0.1, color_jitter=0.3, aa="rand-m9-mstd0.5-inc1", smoothing=0.1,
    train_interpolation="bicubic", repeated_aug=True, train_mode=True, ThreeAugment=False, src=False,
    reprob=0.25, remode="pixel", recount=1, resplit=False, mixup=0.8, cutmix=1.0, cutmix_minmax=None,
    mixup_prob=1.0, mixup_switch_prob=0.5, mixup_mode="batch", teacher_model="regnety_160", teacher_path="",
    distillation_type="none", distillation_alpha=0.5, distillation_tau=1.0, finetune="",
    data_path="/datasets01/imagenet_full_size/061417/", data_set="IMNET", inat_category="name", output_dir="",
    device="cuda", seed=0, resume="", start_epoch=0, eval=False, eval_crop_ratio=0.875, dist_eval=False,
    num_workers=10, pin_mem=True, distributed=False, world_size=1, dist_url="env://", local_rank=0,
    amp="bfloat16", if_wandb=False, wandb_resume=None)


# Deliberate: the official 0.875 for every file evaluates the 384/448 and patch-8 releases wrongly; `auto` is
# 0.875 except for those (tests/test_validate.py), and an explicit 0.875 keeps the official behaviour.
CHANGED_DEFAULTS = dict(eval_crop_ratio="auto")


def test_every_official_flag_keeps_its_default():
    args = vars(parse([]))
    assert {k: args[k] for k in SPEC_DEFAULTS} == {**SPEC_DEFAULTS, **CHANGED_DEFAULTS}


@pytest.mark.parametrize("model, size, file, crop", [
    ("adventurer_base_patch16", 224, None, 0.875),
    ("adventurer_base_patch16", 128, None, 0.875),  # stage 1 of the recipe: not a released size
    ("adventurer_base_patch16", 384, None, 1.0),
    ("adventurer_base_patch16", 448, "https://huggingface.co/Wangf3014/Adventurer/resolve/main/"
                                     "adventurer_base_patch16_448.pth", 1.0),
    ("adventurer_base_patch16", 224, "/ckpt/adventurer_base_patch16_384.pth", 1.0),  # the file names the release
    ("adventurer_base_patch8", 224, "auto", 1.0),
    ("adventurer_base_patch16_384", 384, "/out/checkpoint.pth", 1.0),
    ("adventurer_tiny_patch16.in1k_224", 224, None, 0.875),
    ("arm_huge_pz16", 384, None, 1.0),
    ("vit_tiny_patch16_224", 224, None, 0.875),  # not ours: the official default
])
def test_auto_crop_is_the_released_checkpoints(model, size, file, crop):
    assert inference.auto_crop_pct(model, size, file)[0] == crop


def test_eval_crop_ratio_flag():
    assert parse([]).eval_crop_ratio == "auto"
    assert parse(["--model", "adventurer_base_patch16_384", "--input-size", "384",
                  "--eval-crop-ratio", "0.875"]).eval_crop_ratio == 0.875  # explicit: used as given
    for bad in ("abc", "0", "1.5"):
        with pytest.raises(SystemExit):
            parse(["--eval-crop-ratio", bad])


def test_official_readme_commands_parse():
    args = parse(_script_args(README_EVAL))
    assert (args.model, args.input_size, args.batch_size, args.eval, args.eval_crop_ratio) == \
        ("adventurer_base_patch16", 224, 128, True, 0.875)
    assert args.resume == "/PATH/TO/CHECKPOINT"
    stage1, stage2, stage3 = (parse(_script_args(c)) for c in README_STAGES)
    assert (stage1.input_size, stage1.epochs, stage1.ThreeAugment, stage1.smoothing, stage1.dist_eval) == \
        (128, 300, True, 0.0, True)
    assert (stage2.finetune, stage2.drop_path, stage2.input_size) == \
        ("./output/adventurer_base_patch16_224/s1_128/checkpoint.pth", 0.4, 224)
    assert (stage3.batch_size, stage3.unscale_lr, stage3.repeated_aug, stage3.weight_decay) == (64, True, False, 0.1)
    brief = parse(shlex.split("--eval --resume adventurer_base_patch16_224.pth --model adventurer_base_patch16 "
                              "--data-path /path/to/imagenet --input-szie 224 --eval-crop-ratio 0.875"))
    assert brief.input_size == 224 and brief.resume == "adventurer_base_patch16_224.pth"


def test_launcher_rank_flags_and_model_kwargs():
    assert parse(["--local-rank=3"]).local_rank == 3
    assert parse(["--local_rank", "2"]).local_rank == 2
    args = parse(["--model-kwargs", "depth=2", "embed_dim=64", "flip_rule=every_two", "ssm_cfg={'headdim': 16}"])
    kwargs = main.parse_model_kwargs(args.model_kwargs)
    assert kwargs == {"depth": 2, "embed_dim": 64, "flip_rule": "every_two", "ssm_cfg": {"headdim": 16}}
    with pytest.raises(SystemExit, match="--input-size"):
        main.parse_model_kwargs(parse(["--model-kwargs", "img_size=64"]).model_kwargs)
    with pytest.raises(SystemExit):  # argparse: "expected KEY=VALUE"
        parse(["--model-kwargs", "depth"])


@pytest.mark.parametrize("flags, message", [
    (["--distillation-type", "hard"], "distillation"),
    (["--resplit"], "resplit"),
    (["--bce-loss"], "--smoothing 0.0"),
    (["--save-every-iters", "-1"], "--save-every-iters must be 0 or more, got -1"),
    (["--save-every-iters", "3", "--accum_iter", "2"], "--save-every-iters 3 must be a multiple of --accum_iter 2"),
])
def test_flags_the_official_code_ignored_are_rejected(flags, message):
    with pytest.raises(SystemExit, match=message):
        main.check_args(parse(flags))


def test_unknown_model_lists_close_matches(folder):
    with pytest.raises(SystemExit, match="unknown model 'adventurer_tiny_patch61'.*adventurer_tiny_patch16"):
        main.main(parse(["--data-set", "FOLDER", "--data-path", str(folder), *TINY,
                         "--model", "adventurer_tiny_patch61"]))


def test_misspelt_model_kwarg_ends_with_one_line(folder):
    with pytest.raises(SystemExit, match="cannot build adventurer_tiny_patch16: .*dept"):
        main.main(parse(["--data-set", "FOLDER", "--data-path", str(folder), *TINY, "--model-kwargs", "dept=2"]))


def test_missing_data_and_checkpoint_end_with_one_line(folder, tmp_path):
    with pytest.raises(SystemExit, match="^error: .*not found"):
        main.main(parse(["--data-set", "FOLDER", "--data-path", str(tmp_path / "nowhere"), *TINY, "--eval"]))
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match=f"^error: {broken}"):
        run_main(folder, "--eval", "--resume", str(broken))


# ---------------------------------------------------------------------------------------------------
# optimiser and schedule


def _optimizer(extra=()):
    args = parse([*TINY, "--layer_decay", "0.5", *extra])
    args.nb_classes = 2
    model = main.build_model(args)
    return args, model, main.build_optimizer(args, model)


def test_layer_decay_groups_and_optimizer_flags():
    args, model, optimizer = _optimizer()
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["eps"] == 1e-8
    scale = {}
    decay = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            scale[names[id(p)]], decay[names[id(p)]] = group["lr_scale"], group["weight_decay"]
    # depth 2: stem id 0, layers.i id i+1, head/norm_f id 3 (official param_groups_lrd)
    assert scale["cls_token"] == scale["patch_embed.proj.weight"] == 0.125
    assert scale["layers.0.mixer.in_proj.weight"] == 0.25 and scale["layers.1.mixer.A_log"] == 0.5
    assert scale["head.weight"] == scale["norm_f.weight"] == 1.0
    assert decay["pos_embed"] == decay["cls_token"] == decay["head.bias"] == 0.0
    assert decay["head.weight"] == decay["layers.0.mixer.conv1d.weight"] == 0.05
    # group order and membership equal the official param_groups_lrd, so official optimizer states map 1:1
    official = {}
    for name, p in model.named_parameters():
        layer = 0 if name.split(".")[0] in ("cls_token", "pos_embed", "patch_embed") else \
            int(name.split(".")[1]) + 1 if name.startswith("layers.") else 3
        kind = "no_decay" if p.ndim == 1 or name in model.no_weight_decay() else "decay"
        official.setdefault(f"layer_{layer}_{kind}", []).append(name)
    assert [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups] == list(official.values())
    _, _, sgd = _optimizer(["--opt", "sgd", "--momentum", "0.8"])
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.8
    _, _, adamw = _optimizer(["--opt-eps", "1e-6", "--opt-betas", "0.9", "0.95"])
    assert adamw.defaults["eps"] == 1e-6 and tuple(adamw.defaults["betas"]) == (0.9, 0.95)


def test_scheduler_reproduces_the_official_stage1_lr_table():
    """SPEC 6.10: peak 1e-3 (5e-4 x 1024/512), epochs 0 and 1 at warmup lr, then t = epoch - 1."""
    args = parse(_script_args(README_STAGES[0]))
    args.lr = main.scaled_lr(args, world_size=8)
    assert args.lr == pytest.approx(1e-3)
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.AdamW([{"params": [params[0]], "lr_scale": 0.5}, {"params": [params[1]], "lr_scale": 1.0}],
                                  lr=args.lr)
    scheduler = main.create_lr_scheduler(args, optimizer)
    used = []
    for epoch in range(args.epochs):
        main.step_lr_scheduler(args, scheduler, epoch, "start")
        used.append([g["lr"] for g in optimizer.param_groups])
        main.step_lr_scheduler(args, scheduler, epoch, "end")
    table = {0: 1e-6, 1: 1e-6, 2: 2.008e-4, 3: 4.006e-4, 4: 6.004e-4, 5: 8.002e-4, 6: 9.993e-4, 150: 5.102e-4,
             299: 1.011e-5}
    for epoch, lr in table.items():
        assert used[epoch][1] == pytest.approx(lr, rel=5e-4), epoch
        assert used[epoch][0] == pytest.approx(lr * 0.5, rel=5e-4), epoch  # lr_scale applied once, not twice


def test_per_epoch_start_timing_removes_the_lag():
    args = parse(["--sched-timing", "per-epoch-start", "--lr", "1e-3", "--unscale-lr"])
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
    scheduler = main.create_lr_scheduler(args, optimizer)
    used = []
    for epoch in range(3):
        main.step_lr_scheduler(args, scheduler, epoch, "start")
        used.append(optimizer.param_groups[0]["lr"])
        main.step_lr_scheduler(args, scheduler, epoch, "end")
    assert used == pytest.approx([1e-6, 1e-6 + (1e-3 - 1e-6) / 5, 1e-6 + 2 * (1e-3 - 1e-6) / 5])


# ---------------------------------------------------------------------------------------------------
# training, evaluation, checkpoints


def test_one_epoch_writes_log_and_official_checkpoint(trained):
    output_dir, result = trained
    (row,) = read_log(output_dir)
    assert row["epoch"] == 0 and row["n_parameters"] == sum(p.numel() for p in result["model"].parameters())
    for key in ("train_loss", "train_lr", "test_loss", "test_acc1", "test_acc5",
                "ema_test_loss", "ema_test_acc1", "ema_test_acc5"):
        assert isinstance(row[key], float), key
    assert row["train_lr"] == pytest.approx(1e-6)  # official: epoch 0 trains at the warmup lr
    ckpt = checkpoint.load_checkpoint_file(output_dir / "checkpoint.pth")  # safe loading, no full unpickling
    assert {"model", "optimizer", "lr_scheduler", "epoch", "scaler", "model_ema", "args"} <= set(ckpt)
    assert ckpt["epoch"] == 0 and ckpt["scaler"] == "none" and ckpt["args"].model == "adventurer_tiny_patch16"
    assert ckpt["model"].keys() == ckpt["model_ema"].keys()
    assert any(not torch.equal(ckpt["model"][k], ckpt["model_ema"][k]) for k in ckpt["model"])
    assert (output_dir / "best_checkpoint.pth").is_file()


def test_eval_of_the_saved_checkpoint_reproduces_the_logged_accuracy(trained, folder, tmp_path):
    output_dir, _ = trained
    (row,) = read_log(output_dir)
    stats = run_main(folder, "--eval", "--resume", str(output_dir / "checkpoint.pth"))["stats"]
    for key in ("test_acc1", "test_acc5", "test_loss", "ema_test_acc1", "ema_test_loss"):
        assert stats[key] == pytest.approx(row[key], abs=1e-6), key
    # a released-style file: a bare state dict (no EMA entry, nothing to resume)
    bare = tmp_path / "released.pth"
    torch.save(checkpoint.load_checkpoint_file(output_dir / "checkpoint.pth")["model"], bare)
    stats = run_main(folder, "--eval", "--resume", str(bare), "--output_dir", str(tmp_path))["stats"]
    assert stats["test_acc1"] == pytest.approx(row["test_acc1"]) and "ema_test_acc1" not in stats
    assert json.loads((tmp_path / "log.txt").read_text())["test_acc1"] == pytest.approx(row["test_acc1"])


def test_finetune_across_resolutions_resizes_pos_embed_with_cls_last(trained, folder):
    output_dir, _ = trained
    source = checkpoint.load_checkpoint_file(output_dir / "checkpoint.pth")["model"]
    common = ["--finetune", str(output_dir / "checkpoint.pth"), "--input-size", "48", "--eval"]
    model = run_main(folder, *common)["model"]  # 32 px -> 48 px: grid 2x2 -> 3x3
    assert model.pos_embed.shape == (1, 10, 32)
    expected = checkpoint.resize_pos_embed(source["pos_embed"], (3, 3), cls_position="last")
    torch.testing.assert_close(model.pos_embed.detach(), expected)
    torch.testing.assert_close(model.pos_embed.detach()[:, -1], source["pos_embed"][:, -1])  # cls slot kept
    torch.testing.assert_close(model.layers[1].mixer.in_proj.weight.detach(), source["layers.1.mixer.in_proj.weight"])
    shifted = run_main(folder, *common, "--finetune-pos-shift")["model"]
    torch.testing.assert_close(shifted.pos_embed.detach(),
                               checkpoint.resize_pos_embed(source["pos_embed"], (3, 3), cls_position="first"))
    assert not torch.allclose(shifted.pos_embed, model.pos_embed)


def test_finetune_drops_a_mismatched_head_and_rejects_another_patch_size(trained, folder, tmp_path, capsys):
    output_dir, _ = trained
    state = checkpoint.load_checkpoint_file(output_dir / "checkpoint.pth")
    state["model"]["head.weight"] = torch.zeros(5, 32)  # a 5-class head
    state["model"]["head.bias"] = torch.zeros(5)
    state["model"]["register"] = torch.zeros(1, 4, 32)  # a Mamba-Reg leftover the model lacks
    five_classes = tmp_path / "five.pth"
    torch.save(state, five_classes)
    model = run_main(folder, "--finetune", str(five_classes), "--eval")["model"]
    out = capsys.readouterr().out
    assert "Removing key head.weight" in out and "Removing key register" in out
    assert model.head.weight.shape == (2, 32) and model.head.weight.abs().sum() > 0
    torch.testing.assert_close(model.pos_embed.detach(), state["model"]["pos_embed"])
    with pytest.raises(SystemExit, match="patch size"):
        main.main(parse(["--data-set", "FOLDER", "--data-path", str(folder), *TINY, "--eval",
                         "--finetune", str(five_classes), "--model-kwargs", "depth=2", "embed_dim=32",
                         "patch_size=8"]))


def test_resume_auto_after_a_crash_mid_epoch_continues_at_the_right_epoch_and_lr(folder, tmp_path, monkeypatch):
    schedule = ["--epochs", "3", "--max-iters-per-epoch", "3", "--warmup-epochs", "2", "--unscale-lr", "--lr", "1e-3",
                "--warmup-lr", "1e-4", "--save-every-iters", "1", "--output_dir", str(tmp_path), "--resume", "auto",
                "--no-eval-ema"]
    real_train = main.train_one_epoch
    calls = []

    class Killed(Exception):
        pass

    class CrashingLoader:
        def __init__(self, loader, after):
            self.loader, self.after = loader, after

        def __len__(self):
            return len(self.loader)

        def __iter__(self):
            for position, batch in enumerate(self.loader):
                if position == self.after:
                    raise Killed
                yield batch

    def train(model, criterion, loader, *args, **kwargs):
        epoch = args[2]
        calls.append((epoch, kwargs["first_step"]))
        if epoch == 1 and len(calls) == 2:  # first run, second epoch: die after two iterations
            return real_train(model, criterion, CrashingLoader(loader, 2), *args, **kwargs)
        return real_train(model, criterion, loader, *args, **kwargs)

    monkeypatch.setattr(main, "train_one_epoch", train)
    with pytest.raises(Killed):
        run_main(folder, *schedule)
    mid = checkpoint.load_checkpoint_file(tmp_path / "checkpoint.pth")
    assert (mid["epoch"], mid["sampler"]) == (0, {"epoch": 1, "position": 16})  # 2 iterations of 8 samples

    run_main(folder, *schedule)
    assert calls[2:] == [(1, 2), (2, 0)]  # epoch 1 resumed after its two trained iterations
    rows = read_log(tmp_path)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    # official timing: epoch 0 and 1 at the warmup lr, epoch 2 at t=1 of a 2-epoch warmup
    assert [r["train_lr"] for r in rows] == pytest.approx([1e-4, 1e-4, 1e-4 + (1e-3 - 1e-4) / 2])
    final = checkpoint.load_checkpoint_file(tmp_path / "checkpoint.pth")
    assert final["epoch"] == 2 and final["sampler"] == {"epoch": 3, "position": 0}


def test_fp16_training_uses_a_grad_scaler_and_resumes_it(folder, tmp_path):
    common = ["--amp", "float16", "--max-iters-per-epoch", "2", "--output_dir", str(tmp_path), "--no-model-ema",
              "--mixup", "0", "--cutmix", "0", "--accum_iter", "2"]
    run_main(folder, "--epochs", "1", *common)
    first = checkpoint.load_checkpoint_file(tmp_path / "checkpoint.pth")
    assert isinstance(first["scaler"], dict) and first["scaler"]["scale"] > 1 and first["model_ema"] is None
    run_main(folder, "--epochs", "2", "--resume", str(tmp_path / "checkpoint.pth"), *common)
    assert [r["epoch"] for r in read_log(tmp_path)] == [0, 1]


def test_recipe_variants_train(folder, tmp_path):
    """BCE on mixed targets, ThreeAugment, SGD with layer decay, clipping and a step schedule in one run."""
    run_main(folder, "--bce-loss", "--smoothing", "0", "--ThreeAugment", "--opt", "sgd", "--layer_decay", "0.75",
             "--clip-grad", "1.0", "--sched", "step", "--epochs", "1", "--max-iters-per-epoch", "2",
             "--output_dir", str(tmp_path), "--no-eval-ema", "--unscale-lr", "--lr", "0.01", "--warmup-epochs", "0")
    (row,) = read_log(tmp_path)
    assert 0 < row["train_loss"] < 5 and row["train_lr"] == pytest.approx(0.01) and "ema_test_acc1" not in row


def test_bad_image_stops_with_its_name_or_is_skipped(folder, tmp_path):
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(folder, copy)
    bad = copy / "val" / "class_0" / "0.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(SystemExit, match=f"^error: .*{bad}"):
        run_main(copy, "--eval")
    with pytest.warns(RuntimeWarning, match="skipping unreadable image"):
        stats = run_main(copy, "--eval", "--bad-images", "skip")["stats"]
    assert 0.0 <= stats["test_acc1"] <= 100.0
    assert stats["bad_images_skipped"] == 1


def test_accuracy_rises_on_digits(tmp_path):
    """24 steps on the embedded DIGITS set take a tiny model from chance (10%) to well above it."""
    args = parse(["--data-set", "DIGITS", *TINY, "--model-kwargs", "depth=2", "embed_dim=32", "patch_size=8",
                  "--batch-size", "64", "--epochs", "2", "--max-iters-per-epoch", "12", "--warmup-epochs", "0",
                  "--lr", "4e-3", "--unscale-lr", "--mixup", "0", "--cutmix", "0", "--drop-path", "0",
                  "--no-model-ema", "--amp", "none", "--output_dir", str(tmp_path)])
    main.main(args)
    first, last = read_log(tmp_path)
    assert last["test_loss"] < first["test_loss"] < 2.2
    assert last["test_acc1"] > 25.0


@pytest.mark.slow
def test_two_process_gloo_run_ends_with_identical_parameters(folder, tmp_path, torchrun_main):
    """torchrun --nproc_per_node=2 on the CPU: DDP keeps both ranks' weights (and EMAs) bit-identical."""
    ranks, stdout = torchrun_main(["--data-set", "FOLDER", "--data-path", str(folder), *TINY, "--epochs", "1",
                                   "--max-iters-per-epoch", "2", "--dist-eval", "--output_dir", str(tmp_path / "out"),
                                   "--model-ema-decay", "0.5"])
    for part in ("model", "ema"):
        for key, value in ranks[0][part].items():
            assert torch.equal(value, ranks[1][part][key]), (part, key)
    assert len(read_log(tmp_path / "out")) == 1  # only rank 0 writes log.txt
    assert "distributed init (rank 0/2, gloo)" in stdout
