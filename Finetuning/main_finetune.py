"""ARM finetuning for image classification (official `Finetuning/main_finetune.py` recipe, SPEC 8).

Run from this folder as the README does (`cd Finetuning`); the shared modules are imported from the
repository root. Official flags and defaults are kept. Official defects fixed (SPEC 9 items 18-20):
`--ema_decay` left unset means "no EMA" instead of a crash; `--eval` evaluates the `--resume` checkpoint
(model, and its EMA when stored) without needing DDP; best checkpoints store their real epoch
(`--official-epoch-fields` restores -10/-20); `--global_pool False` really means False; a resumed
checkpoint without accuracy fields starts from 0; an unknown `--model` lists the valid names;
`--finetune` also accepts an already finetuned checkpoint (position table resized, no second zero
token); the EMA starts from DDP's broadcast weights on every rank; the distributed validation sampler
does not shuffle. The tracker flags are main.py's (advarm.loggers): a resume continues the same
wandb/mlflow/TensorBoard run. The run-safety flags of advarm.runs (`--save-every-iters`, `--overwrite`,
`--skip-nonfinite`, `--check-images`) and its one-run-per-folder lock apply; a resumed run continues bit for
bit.
"""
import argparse
import datetime
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from timm.data import Mixup  # noqa: E402
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy  # noqa: E402
from timm.optim import param_groups_layer_decay  # noqa: E402
from timm.utils import ModelEmaV3, NativeScaler, ParseKwargs  # noqa: E402

import datasets  # noqa: E402
import engine  # noqa: E402
import models_arm  # noqa: E402
import samplers  # noqa: E402
from advarm import checkpoint, cli, loggers, runs, utils  # noqa: E402

TRUE_WORDS = {"true", "1", "yes", "y", "on", "t", "avg", "mean"}
FALSE_WORDS = {"false", "0", "no", "n", "off", "f", "", "token", "cls"}
# Left freshly initialised by the pretrain -> finetune transfer (SPEC 4.4 step 4).
FRESH_AFTER_TRANSFER = ("cls_token", "head.", "norm_f.")


def str2bool(text):
    """Official `type=bool` made every non-empty string True ("False" included); read the word instead."""
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected one of {sorted(TRUE_WORDS | FALSE_WORDS - {''})}, got {text!r}")


def get_args_parser():
    parser = argparse.ArgumentParser("ARM fine-tuning for image classification")
    parser.add_argument("--batch_size", default=64, type=int,
                        help="batch size per GPU (effective batch = batch_size * accum_iter * world size)")
    parser.add_argument("--epochs", default=50, type=int)
    parser.add_argument("--accum_iter", default=1, type=int, help="gradient accumulation steps")
    parser.add_argument("--max-iters-per-epoch", dest="max_iters_per_epoch", default=None, type=int,
                        help="stop each training epoch after this many iterations (smoke tests)")

    # Model
    parser.add_argument("--model", default="vit_large_patch16", type=str, metavar="MODEL",
                        help="arm_base_pz16, arm_large_pz16 or arm_huge_pz16 (the official default is not one)")
    parser.add_argument("--input_size", default=224, type=int, help="model image size and crop size")
    parser.add_argument("--drop_path", type=float, default=0.1, metavar="PCT")
    parser.add_argument("--model-kwargs", dest="model_kwargs", nargs="*", default={}, type=utils.kwarg_pair,
                        action=ParseKwargs, metavar="KEY=VALUE",
                        help="constructor overrides, e.g. patch_size=4 depth=2 embed_dim=64")
    parser.add_argument("--ssm-backend", dest="ssm_backend", default=os.environ.get("SSM_BACKEND", "auto"),
                        choices=["auto", "torch", "mamba_ssm"], help="selective-scan implementation")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (utils.compile_model)")

    # Optimiser and schedule
    parser.add_argument("--clip_grad", type=float, default=None, metavar="NORM")
    parser.add_argument("--weight_decay", type=float, default=0.05)
    parser.add_argument("--lr", type=float, default=None, metavar="LR", help="absolute lr")
    parser.add_argument("--blr", type=float, default=1e-3, metavar="LR",
                        help="base lr: lr = blr * effective batch / 256")
    parser.add_argument("--layer_decay", type=float, default=0.75, help="layer-wise lr decay")
    parser.add_argument("--min_lr", type=float, default=1e-6, metavar="LR")
    parser.add_argument("--warmup_epochs", type=int, default=5, metavar="N")
    parser.add_argument("--amp", default="bfloat16", choices=["bfloat16", "float16", "none"],
                        help="autocast dtype (official: bfloat16)")

    # Augmentation
    parser.add_argument("--color_jitter", type=float, default=None, metavar="PCT",
                        help="colour jitter, used only when --aa is empty")
    parser.add_argument("--aa", type=str, default="rand-m9-mstd0.5-inc1", metavar="NAME")
    parser.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    parser.add_argument("--reprob", type=float, default=0.25, metavar="PCT", help="random erase probability")
    parser.add_argument("--remode", type=str, default="pixel")
    parser.add_argument("--recount", type=int, default=1)
    parser.add_argument("--resplit", action="store_true", default=False, help="accepted, ignored (official)")
    parser.add_argument("--mixup", type=float, default=0, help="mixup alpha, on if > 0")
    parser.add_argument("--cutmix", type=float, default=0, help="cutmix alpha, on if > 0")
    parser.add_argument("--cutmix_minmax", type=float, nargs="+", default=None)
    parser.add_argument("--mixup_prob", type=float, default=1.0)
    parser.add_argument("--mixup_switch_prob", type=float, default=0.5)
    parser.add_argument("--mixup_mode", type=str, default="batch", choices=["batch", "pair", "elem"])
    parser.add_argument("--eval_resize", default="square", choices=["square", "shorter"],
                        help="eval resize: official square (aspect distorted) or shorter side")

    # Finetuning
    parser.add_argument("--finetune", default="", help="pretraining (or finetuned) checkpoint to start from")
    parser.add_argument("--global_pool", type=str2bool, nargs="?", const=True, default=None,
                        help="mean-pool the tokens (bare flag or True); False/0/no: use the cls token")
    parser.add_argument("--cls_token", action="store_false", dest="global_pool",
                        help="classify from the cls token instead of global pooling")
    parser.add_argument("--ema_decay", type=float, default=None,
                        help="EMA decay (README: 0.99992); unset: no EMA")

    # Data
    parser.add_argument("--data_path", default="/datasets01/imagenet_full_size/061417/", type=str)
    parser.add_argument("--data-set", dest="data_set", default="IMNET", choices=["IMNET", "FOLDER", "DIGITS"],
                        help="IMNET/FOLDER: <data_path>/train and /val image folders; DIGITS: embedded digits")
    parser.add_argument("--nb_classes", default=1000, type=int, help="classes (FOLDER/DIGITS: from the data)")
    parser.add_argument("--bad-images", dest="bad_images", default="error", choices=["error", "skip"])
    parser.add_argument("--num_workers", default=10, type=int)
    parser.add_argument("--pin_mem", action="store_true")
    parser.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    parser.set_defaults(pin_mem=True)

    # Output, logging, checkpoints
    parser.add_argument("--output_dir", default="./output_dir", help="where to save, empty for no saving")
    parser.add_argument("--save-every", dest="save_every", default=10, type=int,
                        help="keep checkpoint-{epoch}.pth every N epochs and at the end")
    parser.add_argument("--official-epoch-fields", dest="official_epoch_fields", action="store_true",
                        help="store epoch -10/-20 in the best checkpoints as the official code does")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--resume", default="", help="checkpoint path, or 'auto' for the latest in output_dir")
    parser.add_argument("--start_epoch", default=0, type=int, metavar="N")
    parser.add_argument("--eval", action="store_true", help="evaluate the --resume checkpoint and exit")
    parser.add_argument("--dist_eval", action="store_true", default=False,
                        help="shard validation over the processes")

    # Distributed
    parser.add_argument("--world_size", default=1, type=int)
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", default=-1, type=int)
    parser.add_argument("--dist_on_itp", action="store_true", help="OpenMPI environment variables")
    parser.add_argument("--dist_url", default="env://")
    loggers.add_logger_args(parser, log_dir_default="./output_dir")
    return runs.add_run_flags(parser)


def check_args(args):
    if args.model not in models_arm.MODEL_CONFIGS:  # before any data is read
        raise SystemExit(f"--model {args.model}: not an ARM model; valid names: {', '.join(models_arm.MODEL_CONFIGS)}")
    cli.check_ranges(args, positive=["--epochs", "--batch_size", "--accum_iter", "--input_size", "--save-every",
                                     "--nb_classes"],
                     non_negative=["--lr", "--blr", "--min_lr", "--warmup_epochs", "--save-every-iters",
                                   "--skip-nonfinite", "--num_workers"])
    cli.check_multiple(args, "--save-every-iters", "--accum_iter")


def build_model(args):
    kwargs = dict(num_classes=args.nb_classes, drop_path_rate=args.drop_path, global_pool=bool(args.global_pool),
                  img_size=args.input_size)
    overrides = dict(args.model_kwargs)
    if overrides.get("img_size", args.input_size) != args.input_size:
        raise SystemExit(f"--model-kwargs img_size={overrides['img_size']} conflicts with --input_size "
                         f"{args.input_size}; the finetuning model is built at --input_size")
    try:
        model = models_arm.create_finetune_model(args.model, **{**kwargs, **overrides})
    except (ValueError, TypeError) as err:
        raise SystemExit(f"--model {args.model} {overrides or ''}: {err}") from None
    cli.check_patch_grid(args.input_size, model.patch_embed.patch_size, "--input_size")
    return model


def load_finetune_weights(model, path):
    """Start from a pretraining checkpoint (SPEC 4.4) or from an already finetuned ARM checkpoint."""
    state_dict = checkpoint.extract_state_dict(checkpoint.load_checkpoint_file(path))
    print(f"Load pre-trained checkpoint from: {path}")
    if models_arm.is_pretrain_state_dict(state_dict):
        state_dict = models_arm.pretrain_to_finetune(state_dict, model)
        missing, unexpected = checkpoint.load_state_dict_strict(model, state_dict, strict=False, source=path)
        print(f"missing keys (fresh init): {missing}")
        stray = [k for k in missing if not k.startswith(FRESH_AFTER_TRANSFER)] + list(unexpected)
        if stray:
            raise checkpoint.CheckpointError(f"{path}: pretraining checkpoint of another model configuration "
                                             f"(keys {stray[:5]} differ)")
        models_arm.init_head_for_finetune(model)
        return
    # A finetuned classifier: same layout; the pos table is resized with its cls slot kept in the middle.
    state_dict = models_arm.checkpoint_filter_fn(state_dict, model)
    own = model.state_dict()
    new_head = any(k.startswith("head.") and k in own and v.shape != own[k].shape for k, v in state_dict.items())
    if new_head:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    missing, unexpected = checkpoint.load_state_dict_strict(model, state_dict, strict=False, source=path)
    stray = [k for k in missing if not (new_head and k.startswith("head."))] + list(unexpected)
    if stray:
        raise checkpoint.CheckpointError(f"{path}: not an ARM classifier of this shape (keys {stray[:5]} differ)")
    if new_head:
        print("class count differs from the checkpoint: new head")
        models_arm.init_head_for_finetune(model)


def load_resume(args, model, model_ema, optimizer, loss_scaler):
    """Official load_model, with defaults for what older checkpoints lack.

    Returns the checkpoint when it resumes training (it has an optimizer and an epoch), else None.
    """
    ckpt = checkpoint.load_checkpoint_file(args.resume)
    resuming = "optimizer" in ckpt and "epoch" in ckpt
    if resuming:
        runs.check_resumed_flags(args, ckpt, args.resume)
    checkpoint.load_state_dict_strict(model, checkpoint.extract_state_dict(ckpt, key="model"), source=args.resume)
    if model_ema is not None:
        if ckpt.get("model_ema") is not None:
            checkpoint.load_state_dict_strict(model_ema.module, checkpoint.extract_state_dict(ckpt, key="model_ema"),
                                              source=args.resume)
        else:
            print(f"note: {args.resume} has no model_ema; the EMA restarts from the model weights")
            model_ema.set(model)
    print(f"Resume checkpoint {args.resume}")
    if not resuming:
        return None
    runs.restore_training(args, ckpt, optimizer, loss_scaler, "official best file")
    return ckpt


def build_data(args, device):
    dataset_train, nb_train = datasets.build_dataset(True, args, datasets.build_finetune_transform(True, args))
    dataset_val, _ = datasets.build_dataset(False, args, datasets.build_finetune_transform(False, args))
    if args.data_set != "IMNET" and nb_train != args.nb_classes:
        print(f"note: --nb_classes {args.nb_classes} replaced by the {nb_train} classes of the {args.data_set} data")
        args.nb_classes = nb_train
    if args.check_images:
        datasets.check_images({"training images": dataset_train, "validation images": dataset_val}, args.num_workers)
    num_tasks, global_rank = utils.get_world_size(), utils.get_rank()
    sampler_train = samplers.ResumableSampler(torch.utils.data.DistributedSampler(
        dataset_train, num_replicas=num_tasks, rank=global_rank, shuffle=True), seed=args.seed, rank=global_rank)
    if args.dist_eval:
        if len(dataset_val) % num_tasks:
            print("Warning: the validation set does not split evenly over the processes; duplicated samples "
                  "slightly alter the validation results")
        sampler_val = torch.utils.data.DistributedSampler(dataset_val, num_replicas=num_tasks, rank=global_rank,
                                                          shuffle=False)
    else:
        sampler_val = torch.utils.data.SequentialSampler(dataset_val)
    loader_kwargs = dict(batch_size=args.batch_size, num_workers=args.num_workers,
                         pin_memory=args.pin_mem and device.type == "cuda", persistent_workers=args.num_workers > 0)
    data_loader_train = torch.utils.data.DataLoader(samplers.SeededSamples(dataset_train), sampler=sampler_train,
                                                    drop_last=True, generator=sampler_train.loader_generator(),
                                                    **loader_kwargs)
    data_loader_val = torch.utils.data.DataLoader(dataset_val, sampler=sampler_val, drop_last=False, **loader_kwargs)
    if not args.eval and len(data_loader_train) == 0:
        raise SystemExit(f"--batch_size {args.batch_size} is larger than the {len(sampler_train)} training "
                         f"samples per process; no full batch to train on")
    return data_loader_train, data_loader_val


def build_mixup(args):
    if not (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None):
        return None
    if args.batch_size % 2:
        raise SystemExit(f"--batch_size {args.batch_size}: mixup/cutmix needs an even batch size per process")
    print("Mixup is activated!")
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=args.nb_classes)


def save(args, name, next_epoch, position, model, model_ema, optimizer, loss_scaler, max_accuracy, ema_max_accuracy,
         nonfinite_skipped, stored_epoch=None):
    """Official entries (epoch = the last finished one, or `stored_epoch`) plus the run-state extras."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": next_epoch - 1 if stored_epoch is None else stored_epoch,
        "scaler": loss_scaler.state_dict(),
        "args": args,
        "model_ema": model_ema.module.state_dict() if model_ema is not None else None,
        "max_accuracy": max_accuracy,
        "ema_max_accuracy": ema_max_accuracy,
        "nonfinite_skipped": nonfinite_skipped,
    }
    runs.save_training_state(Path(args.output_dir) / name, state, next_epoch, position,
                             {"model": model, "model_ema": model_ema})


def evaluate_checkpoint(args, model, model_ema, data_loader_val, device, amp_dtype):
    """`--eval`: the --resume checkpoint's model, and its EMA when stored, on the validation set."""
    if not args.resume:
        raise SystemExit("--eval needs --resume PATH (or --resume auto with an --output_dir holding checkpoints)")
    ckpt = checkpoint.load_checkpoint_file(args.resume)
    checkpoint.load_state_dict_strict(model, checkpoint.extract_state_dict(ckpt), source=args.resume)
    results = {"test": engine.evaluate(data_loader_val, model, device, amp_dtype=amp_dtype)}
    print(f"Accuracy of the network on the {len(data_loader_val.dataset)} test images: {results['test']['acc1']:.1f}%")
    if ckpt.get("model_ema") is not None:
        model_ema = model_ema or ModelEmaV3(model, decay=0.0)
        checkpoint.load_state_dict_strict(model_ema.module, checkpoint.extract_state_dict(ckpt, key="model_ema"),
                                          source=args.resume)
        results["ema_test"] = engine.evaluate(data_loader_val, model_ema.module, device, amp_dtype=amp_dtype)
        print(f"Accuracy of the EMA network on the {len(data_loader_val.dataset)} test images: "
              f"{results['ema_test']['acc1']:.1f}%")
    return results


def main(args):
    check_args(args)
    device = utils.start_run(args)
    with runs.run_folder(args):
        return train(args, device)


def train(args, device):
    amp_dtype = utils.parse_amp(args.amp)

    data_loader_train, data_loader_val = build_data(args, device)
    mixup_fn = build_mixup(args)
    model = build_model(args)
    if args.finetune and not args.eval:
        load_finetune_weights(model, args.finetune)
    model.to(device)

    # Created after the transfer and head re-init, before DDP: the EMA starts from the finetuning init.
    model_ema = None
    if args.ema_decay is not None:
        model_ema = ModelEmaV3(model, decay=args.ema_decay)
        print(f"Using EMA with decay = {args.ema_decay:.8f}")

    if args.eval:
        return evaluate_checkpoint(args, model, model_ema, data_loader_val, device, amp_dtype)

    model_without_ddp = model
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"Model = {model_without_ddp}")
    print(f"number of params (M): {n_parameters / 1.e6:.2f}")

    utils.resolve_blr(args)

    utils.compile_model(model, args.compile)
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if device.type == "cuda" else None)
        model_without_ddp = model.module
        if model_ema is not None:
            # DDP broadcast rank 0's weights; ranks seeded seed + rank would otherwise keep different EMAs.
            model_ema.set(model_without_ddp)

    # timm's layer-decay groups with the model's group_matcher reproduce the official param_groups_lrd.
    param_groups = param_groups_layer_decay(model_without_ddp, weight_decay=args.weight_decay,
                                            no_weight_decay_list=model_without_ddp.no_weight_decay(),
                                            layer_decay=args.layer_decay)
    optimizer = torch.optim.AdamW(param_groups, lr=args.lr)
    loss_scaler = NativeScaler(device=device.type)

    if mixup_fn is not None:
        criterion = SoftTargetCrossEntropy()  # smoothing is inside the mixed targets
    elif args.smoothing > 0.:
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()
    print(f"criterion = {criterion}")

    iters_per_epoch = min(len(data_loader_train), args.max_iters_per_epoch or len(data_loader_train))
    lr_scheduler = engine.cosine_per_iteration(optimizer, args.warmup_epochs, args.epochs, iters_per_epoch,
                                               min_lr=args.min_lr)
    ckpt = load_resume(args, model_without_ddp, model_ema, optimizer, loss_scaler) if args.resume else None
    ckpt = ckpt or {}
    max_accuracy, ema_max_accuracy = ckpt.get("max_accuracy", 0.0), ckpt.get("ema_max_accuracy", 0.0)
    start_position = checkpoint.resume_point(ckpt)[1] if ckpt else 0
    nonfinite_skipped = int(ckpt.get("nonfinite_skipped", 0))
    if ckpt and runs.already_finished(args.start_epoch, args.epochs, args.resume):
        return {}
    if max_accuracy > 0:
        test_stats = engine.evaluate(data_loader_val, model_without_ddp, device, amp_dtype=amp_dtype)
        print(f"Accuracy of the resumed network: {test_stats['acc1']:.1f}%")
        if model_ema is not None:
            ema_test_stats = engine.evaluate(data_loader_val, model_ema.module, device, amp_dtype=amp_dtype)
            print(f"Accuracy of the resumed EMA network: {ema_test_stats['acc1']:.1f}%")
    if ckpt:
        runs.restore_rng(ckpt)  # after the evaluations above, which an uninterrupted run does not do
    runs.trim_log(args.output_dir, args.start_epoch)
    del ckpt

    def save_as(name, next_epoch, position=0, stored_epoch=None):
        save(args, name, next_epoch, position, model_without_ddp, model_ema, optimizer, loss_scaler, max_accuracy,
             ema_max_accuracy, nonfinite_skipped, stored_epoch)

    logger = loggers.ExperimentLogger(args, args.output_dir,
                                      start_step=args.start_epoch * iters_per_epoch + start_position // args.batch_size)
    print(f"Start training for {args.epochs} epochs")
    start_time = time.time()
    log_stats = {}
    for epoch in range(args.start_epoch, args.epochs):
        data_loader_train.sampler.set_epoch(epoch)
        start = start_position if epoch == args.start_epoch else 0
        data_loader_train.sampler.start_at(start)
        loader = data_loader_train
        if args.save_every_iters and args.output_dir:
            loader = checkpoint.SavingEvery(loader, args.save_every_iters, lambda position, epoch=epoch:
                                            save_as("checkpoint--1.pth", epoch, position), start, args.batch_size)
        train_stats = engine.train_one_epoch(
            model, criterion, loader, optimizer, device, epoch, loss_scaler,
            amp_dtype=amp_dtype, clip_grad=args.clip_grad, accum_iter=args.accum_iter, model_ema=model_ema,
            mixup_fn=mixup_fn, lr_scheduler=lr_scheduler, log_writer=logger, print_freq=200,
            max_iters=args.max_iters_per_epoch, start_step=epoch * iters_per_epoch + start // args.batch_size,
            first_step=start // args.batch_size, skip_nonfinite=args.skip_nonfinite - nonfinite_skipped)
        nonfinite_skipped += train_stats.pop("nonfinite_skipped", 0)

        test_stats = engine.evaluate(data_loader_val, model_without_ddp, device, amp_dtype=amp_dtype)
        print(f"Accuracy of the network on the {len(data_loader_val.dataset)} test images: {test_stats['acc1']:.1f}%")
        raw_improved = test_stats["acc1"] > max_accuracy
        max_accuracy = max(max_accuracy, test_stats["acc1"])
        print(f"Max accuracy: {max_accuracy:.2f}%")
        ema_improved, ema_test_stats = False, {}
        if model_ema is not None:
            ema_test_stats = engine.evaluate(data_loader_val, model_ema.module, device, amp_dtype=amp_dtype)
            print(f"Accuracy of the EMA network: {ema_test_stats['acc1']:.1f}%")
            ema_improved = ema_test_stats["acc1"] > ema_max_accuracy
            ema_max_accuracy = max(ema_max_accuracy, ema_test_stats["acc1"])
            print(f"Max EMA accuracy: {ema_max_accuracy:.2f}%")

        log_stats = {**{f"train_{k}": v for k, v in train_stats.items()},
                     **{f"test_{k}": v for k, v in test_stats.items()},
                     **{f"ema_test_{k}": v for k, v in ema_test_stats.items()},
                     "epoch": epoch, "n_parameters": n_parameters}
        if args.skip_nonfinite:
            log_stats["train_nonfinite_skipped"] = nonfinite_skipped
        skipped = datasets.skipped_images(data_loader_train.dataset, data_loader_val.dataset)
        if skipped:
            log_stats["bad_images_skipped"] = skipped
        # The row comes first: a kill before the epoch's checkpoints are written makes the resume redo
        # (and re-log) the epoch. The rolling file comes last.
        logger.log(log_stats, step=(epoch + 1) * iters_per_epoch)

        if args.output_dir:
            # Written after the running maxima are updated, so resuming from a best file keeps them.
            if raw_improved:
                save_as("checkpoint--10.pth", epoch + 1, stored_epoch=-10 if args.official_epoch_fields else None)
            if ema_improved:
                save_as("checkpoint--20.pth", epoch + 1, stored_epoch=-20 if args.official_epoch_fields else None)
            if epoch % args.save_every == 0 or epoch + 1 == args.epochs:
                save_as(f"checkpoint-{epoch}.pth", epoch + 1)
            # Rolling file, as pretraining writes: `--resume auto` after a kill loses at most one epoch.
            save_as("checkpoint--1.pth", epoch + 1)

    if args.distributed:
        utils.parameter_checksum_in_sync(model_without_ddp, device)
        if model_ema is not None:
            utils.parameter_checksum_in_sync(model_ema.module, device, "EMA ")
    logger.close(checkpoint=Path(args.output_dir) / "checkpoint--10.pth" if args.output_dir else None)
    print(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")
    return log_stats


if __name__ == "__main__":
    args = cli.one_line_errors(get_args_parser()).parse_args()
    try:
        main(args)
    except (checkpoint.CheckpointError, datasets.DatasetError) as err:
        sys.exit(f"error: {err}")
