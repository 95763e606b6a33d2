"""Adventurer supervised training and evaluation (DeiT-style; official `main.py`, SPEC 6).

Every official flag keeps its name and default. Departures from the official script, all deliberate:
* runs as one process without a launcher (CPU or one GPU), under torchrun / `torch.distributed.launch
  --use_env` on nccl or gloo; `--local-rank` and `--local_rank` are both accepted;
* `--opt`, `--opt-eps` and `--momentum` work (timm `create_optimizer_v2` with the official layer-decay
  groups); `--resplit` and distillation, which the official code silently ignored or could not run, are
  rejected with a message;
* loss scaling follows the precision: fp16 always uses a GradScaler (timm NativeScaler), bf16 and fp32
  never do (the official code scaled only when `--accum_iter > 1`, so fp16 ran unscaled by default);
* the EMA weights are evaluated every epoch (`ema_test_*` in log.txt); `best_checkpoint.pth` still follows
  the raw model as in the official code;
* the lr per epoch is the official one (timm cosine stepped after each epoch, SPEC 6.10), and a resumed run
  continues with the lr an uninterrupted run would use (the official resume trained one epoch ahead);
  timm >= 0.9 schedulers apply each group's `lr_scale` themselves, so the engine does not apply it again;
* `--finetune` resizes the position table with the class token LAST (Adventurer's layout); the official
  one-token-shifted resize is opt-in with `--finetune-pos-shift` (SPEC 9.2); a different patch size is an
  error; keys the model lacks are skipped and reported instead of raising KeyError;
* `--eval-crop-ratio` defaults to `auto`: the crop of the released checkpoint the run names (1.0 for the
  384/448 and patch-8 files, which the official default 0.875 evaluated wrongly), else 0.875; an explicit
  value is used as given;
* `--resume auto`, `--save-every-iters N` (a killed job loses at most N iterations), one run per
  `--output_dir` and bit-exact resumes (sampler position and RNG states in the checkpoint): advarm.runs;
* wandb, mlflow and TensorBoard (advarm.loggers flags) continue the same run after a resume, with run ids
  kept in the checkpoint, on one step axis (iterations trained), with per-step train loss/lr as well.
"""
import argparse
import copy
import datetime
import math
import time
from pathlib import Path

import torch
import torch.backends.cudnn as cudnn
import torch.distributed as dist
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import create_model
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, NativeScaler, ParseKwargs, random_seed

import datasets
import inference
import models_adventurer  # noqa: F401  (registers adventurer_* models in timm)
import samplers
from advarm import checkpoint, cli, kernels, loggers, runs, utils
from augment import new_data_aug_generator
from engine import evaluate, train_one_epoch

# Checkpoint entries a finetune drops when the model lacks them or their shape differs (official list,
# which includes Mamba-Reg leftovers such as `register`).
FINETUNE_DROPPABLE = ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias", "cls_token",
                      "pos_embed_cls", "register", "neck.weight", "norm_neck.weight")
LR_REFERENCE_BATCH = 512
# Flags a timm scheduler's state holds: when one differs on resume, the schedule follows the new value.
SCHEDULE_FLAGS = {"sched", "epochs", "lr", "warmup_lr", "min_lr", "warmup_epochs", "decay_epochs", "cooldown_epochs",
                  "patience_epochs", "decay_rate", "lr_noise", "lr_noise_pct", "lr_noise_std"}


def crop_ratio(text):
    """argparse type of --eval-crop-ratio: 'auto' or a ratio in (0, 1]."""
    if text == "auto":
        return text
    try:
        ratio = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number, got {text!r}") from None
    if not 0 < ratio <= 1:
        raise argparse.ArgumentTypeError(f"the crop ratio must be in (0, 1], got {ratio}")
    return ratio


def get_args_parser():
    parser = argparse.ArgumentParser("Adventurer training and evaluation script", add_help=False)
    parser.add_argument("--batch-size", default=64, type=int, help="per-process batch (train and val)")
    parser.add_argument("--epochs", default=300, type=int)
    parser.add_argument("--bce-loss", action="store_true",
                        help="binary cross-entropy on targets thresholded at 0 (needs --smoothing 0)")
    parser.add_argument("--unscale-lr", action="store_true", help="do not scale --lr by effective batch / 512")
    parser.add_argument("--accum_iter", default=1, type=int, help="gradient accumulation steps")

    # Model
    parser.add_argument("--model", default="adventurer_base_patch16_224", type=str, metavar="MODEL")
    parser.add_argument("--input-size", "--input-szie", dest="input_size", default=224, type=int,
                        help="image size (--input-szie: the official README's spelling)")
    parser.add_argument("--drop", type=float, default=0.0, metavar="PCT", help="dropout after the position embedding")
    parser.add_argument("--drop-path", type=float, default=0.1, metavar="PCT")
    parser.add_argument("--model-kwargs", nargs="*", default={}, type=utils.kwarg_pair, action=ParseKwargs,
                        metavar="KEY=VALUE", help="extra model constructor arguments, e.g. depth=2 embed_dim=64")
    parser.add_argument("--flip-rule", default="official", choices=["official", "every_two"],
                        help="which blocks flip the patch order (SPEC 9.1)")
    parser.add_argument("--ssm-backend", default=None, choices=["auto", "torch", "mamba_ssm"],
                        help="SSM kernels (default: $SSM_BACKEND or auto)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (utils.compile_model)")

    parser.add_argument("--model-ema", action="store_true")
    parser.add_argument("--no-model-ema", action="store_false", dest="model_ema")
    parser.set_defaults(model_ema=True)
    parser.add_argument("--model-ema-decay", type=float, default=0.99996, help="EMA decay per optimiser step")
    parser.add_argument("--model-ema-force-cpu", action="store_true", default=False, help="keep the EMA on the CPU")
    parser.add_argument("--load_ema", action="store_true", default=False, help="--finetune from the EMA weights")
    parser.add_argument("--eval-ema", action="store_true", help="evaluate the EMA weights too (default)")
    parser.add_argument("--no-eval-ema", action="store_false", dest="eval_ema")
    parser.set_defaults(eval_ema=True)

    # Optimizer
    parser.add_argument("--opt", default="adamw", type=str, metavar="OPTIMIZER", help="any timm optimizer name")
    parser.add_argument("--opt-eps", default=1e-8, type=float, metavar="EPSILON")
    parser.add_argument("--opt-betas", default=(0.9, 0.999), type=float, nargs="+", metavar="BETA")
    parser.add_argument("--clip-grad", type=float, default=None, metavar="NORM", help="max gradient norm")
    parser.add_argument("--momentum", type=float, default=0.9, metavar="M", help="for SGD-style optimizers")
    parser.add_argument("--weight-decay", type=float, default=0.05)

    # Learning-rate schedule
    parser.add_argument("--sched", default="cosine", type=str, metavar="SCHEDULER")
    parser.add_argument("--lr", type=float, default=5e-4, metavar="LR")
    parser.add_argument("--lr-noise", type=float, nargs="+", default=None, metavar="pct, pct")
    parser.add_argument("--lr-noise-pct", type=float, default=0.67, metavar="PERCENT")
    parser.add_argument("--lr-noise-std", type=float, default=1.0, metavar="STDDEV")
    parser.add_argument("--warmup-lr", type=float, default=1e-6, metavar="LR")
    parser.add_argument("--min-lr", type=float, default=1e-5, metavar="LR")
    parser.add_argument("--layer_decay", default=1.0, type=float, help="layer-wise lr decay")
    parser.add_argument("--decay-epochs", type=float, default=30, metavar="N")
    parser.add_argument("--warmup-epochs", type=int, default=5, metavar="N")
    parser.add_argument("--cooldown-epochs", type=int, default=10, metavar="N",
                        help="accepted; like the official loop, training stops at --epochs")
    parser.add_argument("--patience-epochs", type=int, default=10, metavar="N")
    parser.add_argument("--decay-rate", "--dr", type=float, default=0.1, metavar="RATE")
    parser.add_argument("--sched-timing", default="official", choices=["official", "per-epoch-start"],
                        help="official: step after each epoch (epochs 0 and 1 both at --warmup-lr); "
                             "per-epoch-start: epoch e trains at the schedule's value for e")

    # Augmentation
    parser.add_argument("--color-jitter", type=float, default=0.3, metavar="PCT")
    parser.add_argument("--aa", type=str, default="rand-m9-mstd0.5-inc1", metavar="NAME")
    parser.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    parser.add_argument("--train-interpolation", type=str, default="bicubic")
    parser.add_argument("--repeated-aug", action="store_true")
    parser.add_argument("--no-repeated-aug", action="store_false", dest="repeated_aug")
    parser.set_defaults(repeated_aug=True)
    parser.add_argument("--train-mode", action="store_true")
    parser.add_argument("--no-train-mode", action="store_false", dest="train_mode")
    parser.set_defaults(train_mode=True)
    parser.add_argument("--ThreeAugment", action="store_true")
    parser.add_argument("--src", action="store_true", help="simple random crop inside ThreeAugment")
    parser.add_argument("--reprob", type=float, default=0.25, metavar="PCT", help="random erasing probability")
    parser.add_argument("--remode", type=str, default="pixel")
    parser.add_argument("--recount", type=int, default=1)
    parser.add_argument("--resplit", action="store_true", default=False, help="not supported (rejected)")
    parser.add_argument("--mixup", type=float, default=0.8)
    parser.add_argument("--cutmix", type=float, default=1.0)
    parser.add_argument("--cutmix-minmax", type=float, nargs="+", default=None)
    parser.add_argument("--mixup-prob", type=float, default=1.0)
    parser.add_argument("--mixup-switch-prob", type=float, default=0.5)
    parser.add_argument("--mixup-mode", type=str, default="batch")

    # Distillation: accepted for command-line compatibility, only "none" runs (SPEC 9.13)
    parser.add_argument("--teacher-model", default="regnety_160", type=str, metavar="MODEL")
    parser.add_argument("--teacher-path", type=str, default="")
    parser.add_argument("--distillation-type", default="none", choices=["none", "soft", "hard"], type=str)
    parser.add_argument("--distillation-alpha", default=0.5, type=float)
    parser.add_argument("--distillation-tau", default=1.0, type=float)

    # Initialisation
    parser.add_argument("--finetune", default="", help="initialise from this checkpoint (SPEC 6.4)")
    parser.add_argument("--finetune-pos-shift", action="store_true",
                        help="official one-token-shifted position resize (default: class token kept last)")

    # Data
    parser.add_argument("--data-path", default="/datasets01/imagenet_full_size/061417/", type=str)
    parser.add_argument("--data-set", default="IMNET", choices=list(datasets.DATA_SETS), type=str)
    parser.add_argument("--inat-category", default="name", type=str,
                        choices=["kingdom", "phylum", "class", "order", "supercategory", "family", "genus", "name"])
    parser.add_argument("--bad-images", default="error", choices=list(datasets.BAD_IMAGE_MODES),
                        help="unreadable image: stop naming it, or skip it with a warning")

    # Run
    parser.add_argument("--output_dir", default="", help="where to save checkpoints and log.txt; empty: nowhere")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--resume", default="", help="checkpoint path or https URL; 'auto': newest in --output_dir")
    parser.add_argument("--start_epoch", default=0, type=int, metavar="N")
    parser.add_argument("--eval", action="store_true", help="evaluate only")
    parser.add_argument("--eval-crop-ratio", default="auto", type=crop_ratio,
                        help="eval resize = input size / ratio; auto (default): the crop of the released checkpoint "
                             "that --resume's file name or --model at --input-size names, else the official 0.875")
    parser.add_argument("--dist-eval", action="store_true", default=False, help="shard the validation set")
    parser.add_argument("--num_workers", default=10, type=int)
    parser.add_argument("--pin-mem", action="store_true")
    parser.add_argument("--no-pin-mem", action="store_false", dest="pin_mem")
    parser.set_defaults(pin_mem=True)
    parser.add_argument("--max-iters-per-epoch", default=None, type=int, metavar="N",
                        help="stop each training epoch after N iterations (tests, debugging)")

    # Distributed
    parser.add_argument("--distributed", action="store_true", default=False, help="set by the launcher")
    parser.add_argument("--world_size", default=1, type=int)
    parser.add_argument("--dist_url", default="env://")
    parser.add_argument("--local-rank", "--local_rank", dest="local_rank", default=0, type=int,
                        help="accepted for launchers that pass it; LOCAL_RANK from the environment wins")

    # Precision and logging
    parser.add_argument("--amp", default="bfloat16", choices=["bfloat16", "float16", "none", ""],
                        help="autocast dtype; float16 adds a GradScaler; none or '' disables autocast")
    parser.add_argument("--log-every", default=10, type=int, metavar="N", help="progress line every N iterations")
    loggers.add_logger_args(parser)
    return runs.add_run_flags(parser)


def parse_model_kwargs(model_kwargs):
    """`--model-kwargs` as a dict; num_classes and img_size belong to their own flags."""
    kwargs = dict(model_kwargs)
    for key, flag in (("num_classes", "the data set"), ("img_size", "--input-size")):
        if key in kwargs:
            raise SystemExit(f"--model-kwargs {key}=... is set by {flag}; remove it")
    return kwargs


def check_args(args):
    """Reject settings the official code silently ignored or could not run."""
    if args.distillation_type != "none":
        raise SystemExit("--distillation-type soft/hard is not supported: Adventurer models return one output, "
                         "so the official DistillationLoss could never run; use --distillation-type none")
    if args.resplit:
        raise SystemExit("--resplit is not supported (the official script accepted and ignored it)")
    if args.bce_loss and args.smoothing > 0:
        raise SystemExit("--bce-loss thresholds targets at 0 (official), which turns smoothed targets into all "
                         "ones; pass --smoothing 0.0 with --bce-loss")
    if args.sched_timing != "official" and args.sched == "plateau":
        raise SystemExit("--sched plateau needs the validation metric, so it only runs with --sched-timing official")
    cli.check_ranges(args, positive=["--epochs", "--batch-size", "--accum_iter", "--input-size"],
                     non_negative=["--lr", "--warmup-lr", "--min-lr", "--warmup-epochs", "--save-every-iters",
                                   "--skip-nonfinite", "--num_workers"])
    cli.check_multiple(args, "--save-every-iters", "--accum_iter")  # saves happen after optimiser steps


def build_model(args):
    inference.check_model_name(args.model)
    print(f"Creating model: {args.model}")
    try:
        model = create_model(args.model, pretrained=False, num_classes=args.nb_classes, drop_rate=args.drop,
                             drop_path_rate=args.drop_path, drop_block_rate=None, img_size=args.input_size,
                             flip_rule=args.flip_rule, **parse_model_kwargs(args.model_kwargs))
    except (TypeError, ValueError) as err:  # a misspelt --model-kwargs key or an impossible geometry
        raise SystemExit(f"cannot build {args.model}: {err}") from None
    cli.check_patch_grid(args.input_size, model.patch_embed.patch_size, "--input-size")
    return model


def _grid(model):
    grid = model.patch_embed.grid_size
    return (grid, grid) if isinstance(grid, int) else tuple(grid)


def load_finetune_weights(model, args):
    """--finetune (SPEC 6.4): another stage's weights, with head and position table adapted to this model."""
    source = args.finetune
    state_dict = checkpoint.extract_state_dict(checkpoint.load_checkpoint_container(source),
                                               key="model_ema" if args.load_ema else None)
    target = model.state_dict()
    patch_key = "patch_embed.proj.weight"
    if patch_key in state_dict and state_dict[patch_key].shape[-2:] != target[patch_key].shape[-2:]:
        raise checkpoint.CheckpointError(
            f"{source}: patch size {tuple(state_dict[patch_key].shape[-2:])} differs from the model's "
            f"{tuple(target[patch_key].shape[-2:])}; pick a --model (or --model-kwargs patch_size=...) that matches")
    for key in FINETUNE_DROPPABLE:
        if key in state_dict and (key not in target or state_dict[key].shape != target[key].shape):
            print(f"Removing key {key} from pretrained checkpoint")
            del state_dict[key]
    if "pos_embed" in state_dict and state_dict["pos_embed"].shape != target["pos_embed"].shape:
        cls_position = "first" if args.finetune_pos_shift else "last"
        old = tuple(state_dict["pos_embed"].shape)
        state_dict["pos_embed"] = checkpoint.resize_pos_embed(state_dict["pos_embed"], _grid(model),
                                                              cls_position=cls_position)
        print(f"Resized pos_embed {old} -> {tuple(state_dict['pos_embed'].shape)} (cls_position={cls_position})")
    missing, unexpected = checkpoint.load_state_dict_strict(model, state_dict, strict=False, source=source)
    lost = [k for k in missing if k not in FINETUNE_DROPPABLE]  # official: trained them from random weights
    if lost:
        raise checkpoint.CheckpointError(f"{source}: not a checkpoint of this architecture; {len(lost)} of the "
                                         f"model's tensors are missing from it (e.g. {', '.join(lost[:3])})")
    print(f"Finetuning from {source}: loaded {len(state_dict) - len(unexpected)} tensors"
          + (f"; kept at initialisation: {', '.join(missing)}" if missing else "")
          + (f"; ignored from the checkpoint: {', '.join(unexpected)}" if unexpected else ""))


def build_data(args, device):
    """Datasets, samplers and the val loader (SPEC 6.2); sets args.nb_classes."""
    dataset_val, args.nb_classes = datasets.build_dataset(is_train=False, args=args)
    args.pin_mem = args.pin_mem and device.type == "cuda"  # pinning needs an accelerator
    distributed = args.distributed
    world_size, rank = utils.get_world_size(), utils.get_rank()
    if distributed and args.dist_eval:
        if len(dataset_val) % world_size:
            print("Warning: the validation set does not split evenly over the processes; some samples are "
                  "evaluated twice, which shifts the reported numbers slightly")
        sampler_val = torch.utils.data.DistributedSampler(dataset_val, world_size, rank, shuffle=False)
    else:
        sampler_val = torch.utils.data.SequentialSampler(dataset_val)
    loader_val = torch.utils.data.DataLoader(dataset_val, sampler=sampler_val, batch_size=args.batch_size,
                                             num_workers=args.num_workers, pin_memory=args.pin_mem, drop_last=False)
    if args.eval:
        return None, None, dataset_val, loader_val

    dataset_train, _ = datasets.build_dataset(is_train=True, args=args)
    if args.check_images:
        datasets.check_images({"training images": dataset_train, "validation images": dataset_val}, args.num_workers)
    if args.ThreeAugment:
        dataset_train.transform = new_data_aug_generator(args)
    if distributed and args.repeated_aug:
        sampler_train = samplers.RASampler(dataset_train, num_replicas=world_size, rank=rank, shuffle=True)
    elif distributed:
        sampler_train = torch.utils.data.DistributedSampler(dataset_train, world_size, rank, shuffle=True,
                                                            seed=args.seed)
    else:
        sampler_train = samplers.EpochSeededRandomSampler(dataset_train, seed=args.seed)
    if len(sampler_train) < args.batch_size:
        raise SystemExit(f"{len(sampler_train)} training samples per process is less than one batch of "
                         f"{args.batch_size} (batches are full, drop_last); lower --batch-size")
    return samplers.ResumableSampler(sampler_train, args.seed, rank), dataset_train, dataset_val, loader_val


def train_loader(args, dataset_train, sampler):
    """This epoch's loader: each sample's augmentation seeded by its position (samplers.ResumableSampler)."""
    return torch.utils.data.DataLoader(samplers.SeededSamples(dataset_train), sampler=sampler,
                                       batch_size=args.batch_size, num_workers=args.num_workers,
                                       pin_memory=args.pin_mem, drop_last=True, generator=sampler.loader_generator())


def build_criterion(args, mixup_active):
    """Official choice (SPEC 6.3); --bce-loss thresholds targets at 0 like the official `targets.gt(0)`."""
    if args.bce_loss:
        return BinaryCrossEntropy(smoothing=0.0, target_threshold=0.0)
    if mixup_active:
        return SoftTargetCrossEntropy()  # smoothing is already in Mixup's targets
    if args.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return torch.nn.CrossEntropyLoss()


def scaled_lr(args, world_size):
    """Linear scaling rule: lr x effective batch / 512, unless --unscale-lr."""
    if args.unscale_lr:
        return args.lr
    return args.lr * args.batch_size * args.accum_iter * world_size / LR_REFERENCE_BATCH


def build_optimizer(args, model):
    """timm optimizer over the official layer-decay groups (built even for layer_decay 1.0, as officially)."""
    extra = {"eps": args.opt_eps, "betas": tuple(args.opt_betas)}
    return create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                               momentum=args.momentum, layer_decay=args.layer_decay, **extra)


def create_lr_scheduler(args, optimizer):
    """timm per-epoch scheduler with the official settings (bit-identical to timm 0.4.12 create_scheduler).

    It writes `value x lr_scale` into every group itself, so the engine runs with layer_scaled_lr=False.
    """
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
        cooldown_epochs=args.cooldown_epochs, patience_epochs=args.patience_epochs, decay_rate=args.decay_rate,
        min_lr=args.min_lr, warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs,
        noise=args.lr_noise, noise_pct=args.lr_noise_pct, noise_std=args.lr_noise_std, noise_seed=args.seed,
        cycle_decay=args.decay_rate, cycle_limit=1)
    return scheduler


def step_lr_scheduler(args, lr_scheduler, epoch, moment, metric=None):
    """Official timing: step(epoch) after epoch `epoch`, so epoch e >= 1 trains at t = e - 1 (SPEC 6.3).

    per-epoch-start: step(epoch) before it, so epoch e trains at t = e.
    """
    if moment == ("end" if args.sched_timing == "official" else "start"):
        lr_scheduler.step(epoch, metric)


def training_state(model, optimizer, lr_scheduler, epoch, model_ema, loss_scaler, args):
    """The official checkpoint layout (SPEC 5.4), so official and our checkpoints resume in either code."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "epoch": epoch,
        "model_ema": model_ema.module.state_dict() if model_ema is not None else None,
        "scaler": loss_scaler.state_dict() if loss_scaler is not None else "none",
        "args": args,
    }


def resume_training(args, ckpt, changed, model, optimizer, lr_scheduler, model_ema, loss_scaler):
    """Restore the training state; returns (start_epoch, samples of it trained). `changed` flags apply."""
    runs.load_optimizer_state(optimizer, ckpt["optimizer"], args.resume)
    if not SCHEDULE_FLAGS & changed.keys():
        lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
    if model_ema is not None:
        if isinstance(ckpt.get("model_ema"), dict):
            checkpoint.load_state_dict_strict(model_ema.module, checkpoint.extract_state_dict(ckpt, "model_ema"),
                                              source=f"{args.resume} (model_ema)")
        else:
            model_ema.set(model)
    if loss_scaler is not None and isinstance(ckpt.get("scaler"), dict):
        loss_scaler.load_state_dict(ckpt["scaler"])
    loggers.continue_runs(args, ckpt)
    start_epoch, position = checkpoint.resume_point(ckpt)
    # The lr an uninterrupted run would use for start_epoch (the official resume used one epoch later).
    if args.sched_timing == "official" and start_epoch > 0:
        lr_scheduler.step(start_epoch - 1)
    return start_epoch, position


def evaluate_models(args, loader_val, model, model_ema, device, amp_dtype):
    """Raw model and (if any) EMA weights -> {'test_*': ..., 'ema_test_*': ...}."""
    print_freq = args.log_every
    stats = {f"test_{k}": v for k, v in evaluate(loader_val, model, device, amp_dtype, print_freq).items()}
    if model_ema is not None:
        ema_device = next(model_ema.parameters()).device
        ema_stats = evaluate(loader_val, model_ema, ema_device, amp_dtype, print_freq, header="Test (EMA):")
        stats.update({f"ema_test_{k}": v for k, v in ema_stats.items()})
    return stats


def run(args):
    print(args)
    if args.ssm_backend:
        kernels.set_backend(args.ssm_backend)
    device = utils.resolve_device(args)
    random_seed(args.seed, utils.get_rank())
    cudnn.benchmark = True

    if args.eval_crop_ratio == "auto":
        args.eval_crop_ratio, source = inference.auto_crop_pct(args.model, args.input_size, args.resume)
        print(f"--eval-crop-ratio auto: {args.eval_crop_ratio} ({source})")
    sampler_train, dataset_train, dataset_val, loader_val = build_data(args, device)
    model = build_model(args)
    if args.finetune:
        load_finetune_weights(model, args)
    model.to(device)
    model_without_ddp = model
    n_parameters = utils.count_parameters(model)
    print(model)
    print("number of params:", n_parameters)

    amp_dtype = utils.parse_amp(args.amp)
    ckpt = checkpoint.load_checkpoint_container(args.resume) if args.resume else None
    resuming = not args.eval and ckpt is not None and all(k in ckpt for k in ("optimizer", "lr_scheduler", "epoch"))
    if not args.eval:
        args.lr = scaled_lr(args, utils.get_world_size())
    changed = runs.check_resumed_flags(args, ckpt, args.resume) if ckpt is not None and not args.eval else {}
    if ckpt is not None:
        checkpoint.load_state_dict_strict(model, checkpoint.extract_state_dict(ckpt), source=args.resume)

    if args.eval:
        logger = loggers.ExperimentLogger(args, args.output_dir)
        ema_model = None
        if args.eval_ema and ckpt is not None and isinstance(ckpt.get("model_ema"), dict):
            ema_model = copy.deepcopy(model)
            checkpoint.load_state_dict_strict(ema_model, checkpoint.extract_state_dict(ckpt, "model_ema"),
                                              source=f"{args.resume} (model_ema)")
        stats = evaluate_models(args, loader_val, model, ema_model, device, amp_dtype)
        print(f"Accuracy of the network on the {len(dataset_val)} test images: {stats['test_acc1']:.1f}%")
        if ema_model is not None:
            print(f"Accuracy of the EMA weights on the {len(dataset_val)} test images: {stats['ema_test_acc1']:.1f}%")
        skipped = datasets.skipped_images(dataset_val)
        if skipped:
            stats["bad_images_skipped"] = skipped
            print(f"{skipped} unreadable images skipped (--bad-images skip)")
        logger.log({**stats, "eval": True, "checkpoint": args.resume}, step=0)
        logger.close()
        return {"model": model, "stats": stats}

    mixup_fn = None
    mixup_active = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    if mixup_active:
        if args.batch_size % 2:
            raise SystemExit(f"mixup/cutmix pair each image with the batch reversed: --batch-size must be even, "
                             f"got {args.batch_size}")
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=args.nb_classes)
    criterion = build_criterion(args, mixup_active)

    # The EMA starts from the weights training starts from (after --finetune / --resume loading).
    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay,
                               device=torch.device("cpu") if args.model_ema_force_cpu else None)
    utils.compile_model(model, args.compile)
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if device.type == "cuda" else None)
        if model_ema is not None:
            # DDP broadcast rank 0's weights; ranks seeded seed + rank would otherwise keep different EMAs.
            model_ema.set(model_without_ddp)

    optimizer = build_optimizer(args, model_without_ddp)
    loss_scaler = NativeScaler(device=device.type) if amp_dtype == torch.float16 else None
    lr_scheduler = create_lr_scheduler(args, optimizer)

    start_position = 0  # samples of the first epoch already trained (a mid-epoch checkpoint)
    if resuming:
        args.start_epoch, start_position = resume_training(
            args, ckpt, changed, model_without_ddp, optimizer, lr_scheduler, model_ema, loss_scaler)
        if runs.already_finished(args.start_epoch, args.epochs, args.resume):
            return {"model": model_without_ddp, "model_ema": model_ema, "stats": {}}
        print(f"Resumed {args.resume} at epoch {args.start_epoch}"
              + (f", {start_position} samples in" if start_position else ""))
        runs.restore_rng(ckpt)
    # -inf: the first evaluated epoch always writes best_checkpoint.pth, even at 0% accuracy.
    max_accuracy = float(ckpt.get("max_accuracy", -math.inf)) if resuming else -math.inf
    nonfinite_skipped = int(ckpt.get("nonfinite_skipped", 0)) if resuming else 0
    runs.trim_log(args.output_dir, args.start_epoch)
    del ckpt

    output_dir = Path(args.output_dir) if args.output_dir else None
    iters_per_epoch = min(len(train_loader(args, dataset_train, sampler_train)), args.max_iters_per_epoch or math.inf)
    logger = loggers.ExperimentLogger(args, args.output_dir,
                                      start_step=args.start_epoch * iters_per_epoch + start_position // args.batch_size)

    def save(name, next_epoch, position=0):
        if output_dir is None:
            return
        state = training_state(model_without_ddp, optimizer, lr_scheduler, next_epoch - 1, model_ema, loss_scaler,
                               args)  # + extras: the best-checkpoint bar and the --skip-nonfinite count
        state.update(max_accuracy=max_accuracy, nonfinite_skipped=nonfinite_skipped)
        runs.save_training_state(output_dir / name, state, next_epoch, position,
                                 {"model": model_without_ddp, "model_ema": model_ema})

    print(f"Start training for {args.epochs} epochs.")
    start_time = time.time()
    ema_max_accuracy = 0.0
    log_stats = {}
    for epoch in range(args.start_epoch, args.epochs):
        sampler_train.set_epoch(epoch)
        step_lr_scheduler(args, lr_scheduler, epoch, "start")
        start = start_position if epoch == args.start_epoch else 0
        sampler_train.start_at(start)
        first_step = start // args.batch_size
        loader = train_loader(args, dataset_train, sampler_train)
        if args.save_every_iters and output_dir is not None:
            loader = checkpoint.SavingEvery(loader, args.save_every_iters, lambda position, epoch=epoch: save(
                "checkpoint.pth", epoch, position), start, args.batch_size)

        train_stats = train_one_epoch(
            model, criterion, loader, optimizer, device, epoch, loss_scaler, amp_dtype=amp_dtype,
            clip_grad=args.clip_grad, accum_iter=args.accum_iter, model_ema=model_ema, mixup_fn=mixup_fn,
            log_writer=logger, start_step=epoch * iters_per_epoch + first_step, print_freq=args.log_every,
            train_mode=args.train_mode, max_iters=args.max_iters_per_epoch, first_step=first_step,
            skip_nonfinite=args.skip_nonfinite - nonfinite_skipped)
        nonfinite_skipped += train_stats.pop("nonfinite_skipped", 0)

        test_stats = evaluate_models(args, loader_val, model, model_ema if args.eval_ema else None,
                                     device, amp_dtype)
        step_lr_scheduler(args, lr_scheduler, epoch, "end", metric=test_stats["test_acc1"])
        print(f"Accuracy of the network on the {len(dataset_val)} test images: {test_stats['test_acc1']:.1f}%")
        improved = test_stats["test_acc1"] > max_accuracy
        max_accuracy = max(max_accuracy, test_stats["test_acc1"])
        print(f"Max accuracy: {max_accuracy:.2f}%")
        if "ema_test_acc1" in test_stats:
            ema_max_accuracy = max(ema_max_accuracy, test_stats["ema_test_acc1"])
            print(f"EMA accuracy: {test_stats['ema_test_acc1']:.2f}%, max {ema_max_accuracy:.2f}%")

        log_stats = {**{f"train_{k}": v for k, v in train_stats.items()}, **test_stats,
                     "epoch": epoch, "n_parameters": n_parameters}
        if args.skip_nonfinite:
            log_stats["train_nonfinite_skipped"] = nonfinite_skipped
        skipped = datasets.skipped_images(dataset_train, dataset_val)
        if skipped:
            log_stats["bad_images_skipped"] = skipped
            print(f"{skipped} unreadable images skipped so far (--bad-images skip)")
        # checkpoint.pth, which marks the epoch done, comes last: a kill before it redoes (and re-logs) the epoch.
        logger.log(log_stats, step=(epoch + 1) * iters_per_epoch)
        if improved:
            save("best_checkpoint.pth", epoch + 1)
        save("checkpoint.pth", epoch + 1)

    logger.close(checkpoint=output_dir / "best_checkpoint.pth" if output_dir else None)
    total_time = time.time() - start_time
    print(f"Training time {datetime.timedelta(seconds=int(total_time))}")
    return {"model": model_without_ddp, "model_ema": model_ema, "stats": log_stats, "max_accuracy": max_accuracy}


def main(args):
    """Train or evaluate; data and checkpoint problems end the run with one line instead of a traceback."""
    try:
        utils.init_distributed_mode(args)
        check_args(args)
        with runs.run_folder(args):
            return run(args)
    except (datasets.DatasetError, checkpoint.CheckpointError, kernels.BackendUnavailableError) as err:
        raise SystemExit(f"error: {err}") from None
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser("Adventurer training and evaluation script", parents=[get_args_parser()])
    main(cli.one_line_errors(parser).parse_args())
