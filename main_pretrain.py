"""ARM autoregressive pretraining (official `main_pretrain.py` recipe, SPEC 7).

Official flags and defaults are kept, so the README command runs as written. Additions (SPEC 11.5 and
9 items 18/20): the epoch stored in the rolling `checkpoint--1.pth` is the real one (so resuming from it
continues instead of restarting at epoch 0; `--official-epoch-fields` restores -1), `--dist_on_itp` is
honoured, `--resume auto`, `--model-kwargs` for small configurations, `--data-set` for small local data,
`--amp` (official: bf16 autocast, fixed) and the opt-in `--wd-skip-ssm`. Nothing is saved when
`--output_dir` is empty (official: `checkpoint--1.pth` landed in the current directory). The tracker flags
are main.py's (advarm.loggers): a resume continues the same wandb/mlflow/TensorBoard run. The run-safety
flags of advarm.runs (`--save-every-iters`, `--overwrite`, `--skip-nonfinite`, `--check-images`) and its
one-run-per-folder lock apply; a resumed run continues bit for bit.
"""
import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import torch
from timm.optim import param_groups_weight_decay
from timm.utils import NativeScaler, ParseKwargs

import datasets
import engine
import models_arm
import samplers
from advarm import checkpoint, cli, loggers, runs, utils


def get_args_parser():
    parser = argparse.ArgumentParser("ARM pre-training")
    parser.add_argument("--batch_size", default=64, type=int,
                        help="batch size per GPU (effective batch = batch_size * accum_iter * world size)")
    parser.add_argument("--epochs", default=400, type=int)
    parser.add_argument("--accum_iter", default=1, type=int, help="gradient accumulation steps")
    parser.add_argument("--clip_grad", default=3.0, type=float, help="max gradient norm")
    parser.add_argument("--max-iters-per-epoch", dest="max_iters_per_epoch", default=None, type=int,
                        help="stop each epoch after this many iterations (smoke tests)")

    # Model
    parser.add_argument("--model", default="arm_base_pz16", type=str, metavar="MODEL")
    parser.add_argument("--input_size", default=192, type=int,
                        help="crop size; the official models are built for 192 (see --model-kwargs)")
    parser.add_argument("--norm_pix_loss", action="store_true",
                        help="accepted for the README command; targets are always normalised (SPEC 9.5)")
    parser.add_argument("--model-kwargs", dest="model_kwargs", nargs="*", default={}, type=utils.kwarg_pair,
                        action=ParseKwargs, metavar="KEY=VALUE",
                        help="constructor overrides, e.g. img_size=48 patch_size=4 depth=4 embed_dim=64")
    parser.add_argument("--ssm-backend", dest="ssm_backend", default=os.environ.get("SSM_BACKEND", "auto"),
                        choices=["auto", "torch", "mamba_ssm"], help="selective-scan implementation")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (utils.compile_model)")

    # Optimiser and schedule
    parser.add_argument("--weight_decay", type=float, default=0.05)
    parser.add_argument("--wd-skip-ssm", dest="wd_skip_ssm", action="store_true",
                        help="no weight decay on no_weight_decay() names and SSM A_log/D (official decays them)")
    parser.add_argument("--lr", type=float, default=None, metavar="LR", help="absolute lr")
    parser.add_argument("--blr", type=float, default=1e-3, metavar="LR",
                        help="base lr: lr = blr * effective batch / 256")
    parser.add_argument("--min_lr", type=float, default=0.0, metavar="LR", help="cosine floor")
    parser.add_argument("--warmup_epochs", type=int, default=40, metavar="N")
    parser.add_argument("--amp", default="bfloat16", choices=["bfloat16", "float16", "none"],
                        help="autocast dtype (official: bfloat16)")

    # Data
    parser.add_argument("--data_path", default="/datasets01/imagenet_full_size/061417/", type=str)
    parser.add_argument("--data-set", dest="data_set", default="IMNET", choices=["IMNET", "FOLDER", "DIGITS"],
                        help="IMNET/FOLDER: <data_path>/train image folders; DIGITS: embedded scikit-learn digits")
    parser.add_argument("--bad-images", dest="bad_images", default="error", choices=["error", "skip"],
                        help="unreadable image: stop with an error naming the file, or skip it with a warning")
    parser.add_argument("--num_workers", default=10, type=int)
    parser.add_argument("--pin_mem", action="store_true", help="pin CPU memory in the DataLoader")
    parser.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    parser.set_defaults(pin_mem=True)

    # Output, logging, checkpoints
    parser.add_argument("--output_dir", default="./output_dir", help="where to save, empty for no saving")
    parser.add_argument("--save-every", dest="save_every", default=20, type=int,
                        help="keep checkpoint-{epoch}.pth every N epochs and at the end")
    parser.add_argument("--official-epoch-fields", dest="official_epoch_fields", action="store_true",
                        help="store epoch -1 in checkpoint--1.pth as the official code does")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--resume", default="", help="checkpoint path, or 'auto' for the latest in output_dir")
    parser.add_argument("--start_epoch", default=0, type=int, metavar="N")

    # Distributed
    parser.add_argument("--world_size", default=1, type=int, help="number of distributed processes")
    parser.add_argument("--local-rank", "--local_rank", dest="local_rank", default=-1, type=int)
    parser.add_argument("--dist_on_itp", action="store_true", help="OpenMPI environment variables")
    parser.add_argument("--dist_url", default="env://")
    loggers.add_logger_args(parser, log_dir_default="./output_dir")
    return runs.add_run_flags(parser)


def check_args(args):
    if args.model not in models_arm.MODEL_CONFIGS:  # before any data is read
        raise SystemExit(f"--model {args.model}: not an ARM model; valid names: {', '.join(models_arm.MODEL_CONFIGS)}")
    cli.check_ranges(args, positive=["--epochs", "--batch_size", "--accum_iter", "--input_size", "--save-every"],
                     non_negative=["--lr", "--blr", "--min_lr", "--warmup_epochs", "--save-every-iters",
                                   "--skip-nonfinite", "--num_workers"])
    cli.check_multiple(args, "--save-every-iters", "--accum_iter")


def build_model(args):
    try:
        return models_arm.create_pretrain_model(args.model, norm_pix_loss=args.norm_pix_loss,
                                                **dict(args.model_kwargs))
    except (ValueError, TypeError) as err:
        raise SystemExit(f"--model {args.model} {dict(args.model_kwargs) or ''}: {err}") from None


def weight_decay_groups(model, args):
    """Official rule (timm add_weight_decay): 1-D tensors and biases undecayed, everything else decayed."""
    skip = ()
    if args.wd_skip_ssm:
        skip = {*model.no_weight_decay(), "*.A*_log", "*.D", "*.D_*"}
    return param_groups_weight_decay(model, weight_decay=args.weight_decay, no_weight_decay_list=skip)


def save(args, name, next_epoch, position, model, optimizer, loss_scaler, nonfinite_skipped, stored_epoch=None):
    """Official entries (epoch = the last finished one, or `stored_epoch`) plus the run-state extras."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": next_epoch - 1 if stored_epoch is None else stored_epoch,
        "scaler": loss_scaler.state_dict(),
        "args": args,
        "nonfinite_skipped": nonfinite_skipped,
    }
    runs.save_training_state(Path(args.output_dir) / name, state, next_epoch, position, {"model": model})


def load_resume(args, model, optimizer, loss_scaler):
    """Strict model load; optimizer, scaler and start epoch follow (official load_model).

    Returns the checkpoint when it resumes training (it has an optimizer and an epoch), else None.
    """
    ckpt = checkpoint.load_checkpoint_file(args.resume)
    resuming = "optimizer" in ckpt and "epoch" in ckpt
    if resuming:
        runs.check_resumed_flags(args, ckpt, args.resume)
    checkpoint.load_state_dict_strict(model, checkpoint.extract_state_dict(ckpt, key="model"), source=args.resume)
    print(f"Resume checkpoint {args.resume}")
    if not resuming:
        return None
    runs.restore_training(args, ckpt, optimizer, loss_scaler, "official rolling file")
    return ckpt


def main(args):
    check_args(args)
    device = utils.start_run(args)
    with runs.run_folder(args):
        return train(args, device)


def train(args, device):
    dataset_train = datasets.build_pretrain_dataset(args)
    print(dataset_train)
    if args.check_images:
        datasets.check_images({"training images": dataset_train}, args.num_workers)
    # Official: always a DistributedSampler (also with one process), shuffled, the last partial batch dropped.
    sampler_train = samplers.ResumableSampler(torch.utils.data.DistributedSampler(
        dataset_train, num_replicas=utils.get_world_size(), rank=utils.get_rank(), shuffle=True),
        seed=args.seed, rank=utils.get_rank())
    data_loader_train = torch.utils.data.DataLoader(
        samplers.SeededSamples(dataset_train), sampler=sampler_train, batch_size=args.batch_size,
        num_workers=args.num_workers, pin_memory=args.pin_mem and device.type == "cuda", drop_last=True,
        persistent_workers=args.num_workers > 0, generator=sampler_train.loader_generator())
    if len(data_loader_train) == 0:
        raise SystemExit(f"--batch_size {args.batch_size} is larger than the {len(sampler_train)} training "
                         f"samples per process; no full batch to train on")

    model = build_model(args)
    if model.patch_embed.img_size != args.input_size:
        raise SystemExit(f"--input_size {args.input_size} does not match the model's img_size "
                         f"{model.patch_embed.img_size} (official models: 192); pass --model-kwargs "
                         f"img_size={args.input_size} to build it at that size")
    model.to(device)
    model_without_ddp = model
    print(f"Model = {model_without_ddp}")

    utils.resolve_blr(args)

    utils.compile_model(model, args.compile)
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if device.type == "cuda" else None)
        model_without_ddp = model.module

    optimizer = torch.optim.AdamW(weight_decay_groups(model_without_ddp, args), lr=args.lr, betas=(0.9, 0.95))
    print(optimizer)
    loss_scaler = NativeScaler(device=device.type)
    amp_dtype = utils.parse_amp(args.amp)
    iters_per_epoch = min(len(data_loader_train), args.max_iters_per_epoch or len(data_loader_train))
    lr_scheduler = engine.cosine_per_iteration(optimizer, args.warmup_epochs, args.epochs, iters_per_epoch,
                                               min_lr=args.min_lr)
    ckpt = load_resume(args, model_without_ddp, optimizer, loss_scaler) if args.resume else None
    start_position = checkpoint.resume_point(ckpt)[1] if ckpt is not None else 0
    nonfinite_skipped = int(ckpt.get("nonfinite_skipped", 0)) if ckpt is not None else 0
    if ckpt is not None and runs.already_finished(args.start_epoch, args.epochs, args.resume):
        return
    if ckpt is not None:
        runs.restore_rng(ckpt)
    runs.trim_log(args.output_dir, args.start_epoch)
    del ckpt

    def save_rolling(next_epoch, position=0):
        save(args, "checkpoint--1.pth", next_epoch, position, model_without_ddp, optimizer, loss_scaler,
             nonfinite_skipped, stored_epoch=-1 if args.official_epoch_fields else None)

    logger = loggers.ExperimentLogger(args, args.output_dir,
                                      start_step=args.start_epoch * iters_per_epoch + start_position // args.batch_size)
    print(f"Start training for {args.epochs} epochs")
    start_time = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        sampler_train.set_epoch(epoch)
        start = start_position if epoch == args.start_epoch else 0
        sampler_train.start_at(start)
        loader = data_loader_train
        if args.save_every_iters and args.output_dir:
            loader = checkpoint.SavingEvery(loader, args.save_every_iters, lambda position, epoch=epoch:
                                            save_rolling(epoch, position), start, args.batch_size)
        train_stats = engine.train_one_epoch(
            model, None, loader, optimizer, device, epoch, loss_scaler,
            amp_dtype=amp_dtype, clip_grad=args.clip_grad, accum_iter=args.accum_iter,
            lr_scheduler=lr_scheduler, log_writer=logger, print_freq=100, max_iters=args.max_iters_per_epoch,
            start_step=epoch * iters_per_epoch + start // args.batch_size, first_step=start // args.batch_size,
            skip_nonfinite=args.skip_nonfinite - nonfinite_skipped)
        nonfinite_skipped += train_stats.pop("nonfinite_skipped", 0)
        log_stats = {**{f"train_{k}": v for k, v in train_stats.items()}, "epoch": epoch}
        if args.skip_nonfinite:
            log_stats["train_nonfinite_skipped"] = nonfinite_skipped
        if datasets.skipped_images(dataset_train):
            log_stats["bad_images_skipped"] = datasets.skipped_images(dataset_train)
        # The row comes first: a kill before the epoch's checkpoints are written makes the resume redo
        # (and re-log) the epoch. The rolling file comes last.
        logger.log(log_stats, step=(epoch + 1) * iters_per_epoch)
        if args.output_dir:
            if epoch % args.save_every == 0 or epoch + 1 == args.epochs:
                save(args, f"checkpoint-{epoch}.pth", epoch + 1, 0, model_without_ddp, optimizer, loss_scaler,
                     nonfinite_skipped)
            save_rolling(epoch + 1)

    if args.distributed:
        utils.parameter_checksum_in_sync(model_without_ddp, device)
    logger.close(checkpoint=Path(args.output_dir) / f"checkpoint-{args.epochs - 1}.pth" if args.output_dir else None)
    print(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")


if __name__ == "__main__":
    args = cli.one_line_errors(get_args_parser()).parse_args()
    try:
        main(args)
    except (checkpoint.CheckpointError, datasets.DatasetError) as err:
        sys.exit(f"error: {err}")
