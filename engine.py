"""Training and evaluation loops shared by main.py, main_pretrain.py and Finetuning/main_finetune.py.

One loop covers the three official engines: the caller picks the loss (a criterion, or None when the
model's forward returns the loss, as ARM pretraining does), the lr rule (a per-iteration timm scheduler
such as `cosine_per_iteration`, or an epoch-level timm scheduler stepped by the caller) and the loss
scaler (`timm.utils.NativeScaler` for fp16, None for bf16/fp32, where scaling is unnecessary).

Steps are training iterations completed since the start of training (advarm.loggers): the per-iteration
scheduler and the per-step log points share that axis.
"""
import math
from contextlib import nullcontext

import torch
from timm.scheduler import CosineLRScheduler
from timm.utils import accuracy

from advarm import utils


class _FirstIterations:
    """The first `limit` batches of a loader, with a matching len() so ETA and progress stay right."""

    def __init__(self, loader, limit):
        self.loader, self.limit = loader, limit

    def __len__(self):
        return min(len(self.loader), self.limit)

    def __iter__(self):
        # zip stops on the range first, so no batch beyond the limit is loaded.
        for _, batch in zip(range(self.limit), self.loader):
            yield batch


def _split_batch(batch):
    """(images, targets) from an ImageFolder-style batch; (images, None) from an unlabelled one."""
    if isinstance(batch, (list, tuple)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def _unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def cosine_per_iteration(optimizer, warmup_epochs, epochs, iters_per_epoch, min_lr=0.0):
    """The MAE/ARM schedule as timm's CosineLRScheduler, stepped with `step_update(iterations done)`.

    At t = epoch + iteration / iters_per_epoch: `lr * t / warmup` during warmup, then
    `min_lr + (lr - min_lr) * (1 + cos(pi * (t - warmup) / (epochs - warmup))) / 2`, times each group's
    `lr_scale` (lr: the optimizer's at construction). warmup_prefix with the cosine part's own length
    is what makes timm's curve the official one.
    """
    return CosineLRScheduler(optimizer, t_initial=max((epochs - warmup_epochs) * iters_per_epoch, 1), lr_min=min_lr,
                             warmup_t=warmup_epochs * iters_per_epoch, warmup_lr_init=0.0, warmup_prefix=True,
                             t_in_epochs=False)


def train_one_epoch(model, criterion, data_loader, optimizer, device, epoch, loss_scaler=None, *,
                    amp_dtype=None, clip_grad=None, accum_iter=1, model_ema=None, mixup_fn=None,
                    bce_targets=False, lr_scheduler=None, layer_scaled_lr=False, log_writer=None,
                    start_step=None, print_freq=10, train_mode=True, max_iters=None, first_step=0, skip_nonfinite=0):
    """One pass over `data_loader`; returns the epoch averages of the meters (`loss`, `lr`).

    criterion: `criterion(outputs, targets)`, or None when `model(images)` returns the loss itself
        (a per-token vector is reduced with `.mean()`; labels are ignored).
    loss_scaler: `timm.utils.NativeScaler` (scaled backward, unscale before clipping) or None.
    lr_scheduler: per-iteration timm scheduler, `step_update(step)` at the start of every accumulation window.
    layer_scaled_lr: multiply every group's lr by its `lr_scale` once at the start of the epoch, for
        schedulers that write unscaled lrs (timm >= 0.9 schedulers scale by themselves: leave False).
    bce_targets: threshold (soft) targets at 0 after mixup, as the official `--bce-loss` does.
    log_writer: an ExperimentLogger; gets `train/loss_step` (mean over ranks) and `train/lr` per update.
    start_step: iterations trained before this call's first batch (default `epoch * iterations per epoch +
        first_step`; a resumed epoch adds the iterations it skips).
    max_iters: stop after this many iterations of the epoch (tests and debugging).
    first_step: iterations of this epoch trained before `data_loader` (a mid-epoch resume): steps are
        numbered from it, so accumulation windows and messages continue where they stopped.
    skip_nonfinite: a NaN/inf loss stops training (SystemExit naming epoch and step) unless this many
        more such steps may still be skipped; a skipped step drops its accumulation window's gradients and
        updates nothing. The count is returned as `nonfinite_skipped` (when allowed at all).
    """
    model.train(train_mode)
    metric_logger = utils.MetricLogger(delimiter="  ")
    metric_logger.add_meter("loss", utils.SmoothedValue())
    metric_logger.add_meter("lr", utils.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    header = f"Epoch: [{epoch}]"

    if layer_scaled_lr:
        for group in optimizer.param_groups:
            group["lr"] *= group.get("lr_scale", 1.0)

    if max_iters is not None:
        data_loader = _FirstIterations(data_loader, max(max_iters - first_step, 0))
    if start_step is None:
        start_step = epoch * (first_step + len(data_loader)) + first_step
    # A window cut short by the end of the epoch is discarded, like the official loops.
    optimizer.zero_grad(set_to_none=True)
    model_for_ema = _unwrap(model)
    skipped = 0

    for step, batch in enumerate(metric_logger.log_every(data_loader, print_freq, header), start=first_step):
        done = start_step + step - first_step  # iterations trained before this batch
        if lr_scheduler is not None and step % accum_iter == 0:
            lr_scheduler.step_update(done)
        samples, targets = _split_batch(batch)
        samples = samples.to(device, non_blocking=True)
        if targets is not None:
            targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        if bce_targets and targets is not None and targets.is_floating_point():
            targets = targets.gt(0.0).to(targets.dtype)

        update_step = (step + 1) % accum_iter == 0
        # Skip the DDP all-reduce on micro-steps that only accumulate.
        sync_context = nullcontext() if update_step or not hasattr(model, "no_sync") else model.no_sync()
        with sync_context:
            with utils.autocast(device, amp_dtype):
                outputs = model(samples)
                loss = outputs.mean() if criterion is None else criterion(outputs, targets)
            loss_value = loss.item()
            if not _finite_everywhere(loss_value):
                if skipped >= skip_nonfinite:
                    raise SystemExit(
                        f"error: loss is {loss_value} at epoch {epoch}, iteration {step}: stopping training; the "
                        f"checkpoints keep the last good weights (lower the lr, clip gradients, use bfloat16 "
                        f"instead of float16, or skip such steps with --skip-nonfinite N; then --resume auto)")
                skipped += 1
                print(f"warning: loss is {loss_value} at epoch {epoch}, iteration {step}: step skipped "
                      f"(--skip-nonfinite allows {skip_nonfinite - skipped} more)")
                optimizer.zero_grad(set_to_none=True)
                continue
            loss = loss / accum_iter
            if loss_scaler is not None:
                loss_scaler(loss, optimizer, clip_grad=clip_grad, parameters=model.parameters(),
                            need_update=update_step)
            else:
                loss.backward()
                if update_step:
                    if clip_grad is not None:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
                    optimizer.step()

        if update_step:
            optimizer.zero_grad(set_to_none=True)
            if model_ema is not None:
                model_ema.update(model_for_ema)
        if device.type == "cuda":
            torch.cuda.synchronize()

        lr = max(group["lr"] for group in optimizer.param_groups)
        metric_logger.update(loss=loss_value)
        metric_logger.update(lr=lr)
        if update_step:
            # Every rank joins the reduce (only rank 0 has a writer; a reduce inside the `if` would hang).
            mean_loss = utils.all_reduce_mean(loss_value)
            if log_writer is not None:
                log_writer.log_step({"train/loss_step": mean_loss, "train/lr": lr}, done + 1)

    metric_logger.synchronize_between_processes()
    print("Averaged stats:", metric_logger)
    stats = {name: meter.global_avg for name, meter in metric_logger.meters.items()}
    if skip_nonfinite:
        stats["nonfinite_skipped"] = skipped
    return stats


def _finite_everywhere(loss_value):
    """Whether the loss is finite on every rank: all ranks must skip or stop together (DDP all-reduces)."""
    finite = float(math.isfinite(loss_value))
    return (utils.all_reduce_mean(finite) if utils.is_dist_avail_and_initialized() else finite) == 1.0


@torch.no_grad()
def evaluate(data_loader, model, device, amp_dtype=None, print_freq=10, header="Test:", max_iters=None):
    """Top-1/top-5 accuracy (percent, weighted by batch size) and mean per-batch cross-entropy.

    Totals are all-reduced over ranks, so every rank returns the same numbers.
    """
    criterion = torch.nn.CrossEntropyLoss()
    metric_logger = utils.MetricLogger(delimiter="  ")
    for name in ("loss", "acc1", "acc5"):
        metric_logger.add_meter(name, utils.SmoothedValue())
    model.eval()
    if max_iters is not None:
        data_loader = _FirstIterations(data_loader, max_iters)

    for batch in metric_logger.log_every(data_loader, print_freq, header):
        images, target = _split_batch(batch)
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with utils.autocast(device, amp_dtype):
            output = model(images)
            loss = criterion(output, target)
        acc1, acc5 = accuracy(output.float(), target, topk=(1, min(5, output.shape[-1])))
        batch_size = images.shape[0]
        metric_logger.update(loss=loss.item())
        metric_logger.meters["acc1"].update(acc1.item(), n=batch_size)
        metric_logger.meters["acc5"].update(acc5.item(), n=batch_size)

    metric_logger.synchronize_between_processes()
    stats = {name: metric_logger.meters[name].global_avg for name in ("loss", "acc1", "acc5")}
    print(f"* Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} loss {stats['loss']:.3f}")
    return stats
