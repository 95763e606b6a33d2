"""Run setup for the entry points, distributed helpers, metric logging, seeding and mixed precision.

Departures from the official helpers, all so that one code path runs everywhere: a single process with
no launcher works (official Adventurer crashes on the unset `args.gpu`), CPU runs use gloo instead of
hard-coded nccl, and metric sync follows the process-group backend instead of assuming CUDA.
"""
import argparse
import builtins
import datetime
import importlib
import importlib.util
import os
import time
from collections import defaultdict, deque
from contextlib import nullcontext

import torch
import torch.distributed as dist
from timm.utils import random_seed

from advarm import kernels

_builtin_print = builtins.print


# ---------------------------------------------------------------------------------------------------
# distributed


def is_dist_avail_and_initialized():
    return dist.is_available() and dist.is_initialized()


def get_world_size():
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank():
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process():
    return get_rank() == 0


def barrier():
    if is_dist_avail_and_initialized():
        dist.barrier()


def _comm_device():
    """Collectives run on CUDA tensors under nccl and on CPU tensors under gloo."""
    return torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_mean(value):
    """Mean of a Python number over all ranks (the number itself when not distributed)."""
    if not is_dist_avail_and_initialized():
        return float(value)
    tensor = torch.tensor(float(value), dtype=torch.float64, device=_comm_device())
    dist.all_reduce(tensor)
    return tensor.item() / get_world_size()


def setup_for_distributed(is_master):
    """Silence print() on non-master ranks; `print(..., force=True)` still prints everywhere."""
    def print(*args, force=False, **kwargs):
        if is_master or force:
            _builtin_print(*args, **kwargs)

    builtins.print = print


def _env_int(name, purpose):
    try:
        return int(os.environ[name])
    except KeyError:
        raise SystemExit(f"{purpose} needs the environment variable {name}, which is not set") from None


def init_distributed_mode(args):
    """Set args.rank/world_size/gpu/distributed/dist_backend from the launcher and join the process group.

    Order: OpenMPI (`args.dist_on_itp`), torchrun / `torch.distributed.launch --use_env` (RANK,
    WORLD_SIZE, LOCAL_RANK; a legacy `--local-rank` flag is the fallback for LOCAL_RANK; run_with_submitit
    exports the same variables for jobs of several tasks), Slurm without a launcher (SLURM_PROCID, world
    size from `--world_size`, as officially), else one process. nccl when the run uses CUDA, gloo otherwise
    (`args.device == "cpu"` or no GPU).
    """
    use_cuda = torch.cuda.is_available() and str(getattr(args, "device", "cuda")).startswith("cuda")
    args.dist_backend = "nccl" if use_cuda else "gloo"
    if getattr(args, "dist_on_itp", False):
        args.rank = _env_int("OMPI_COMM_WORLD_RANK", "--dist_on_itp")
        args.world_size = _env_int("OMPI_COMM_WORLD_SIZE", "--dist_on_itp")
        args.gpu = _env_int("OMPI_COMM_WORLD_LOCAL_RANK", "--dist_on_itp")
        args.dist_url = f"tcp://{os.environ.get('MASTER_ADDR', '127.0.0.1')}:{os.environ.get('MASTER_PORT', '29500')}"
        os.environ.update(LOCAL_RANK=str(args.gpu), RANK=str(args.rank), WORLD_SIZE=str(args.world_size))
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        args.rank = int(os.environ["RANK"])
        args.world_size = int(os.environ["WORLD_SIZE"])
        args.gpu = int(os.environ.get("LOCAL_RANK", max(getattr(args, "local_rank", 0) or 0, 0)))
    elif "SLURM_PROCID" in os.environ and int(getattr(args, "world_size", 1) or 1) > 1:
        args.rank = int(os.environ["SLURM_PROCID"])
        args.world_size = int(args.world_size)
        local = os.environ.get("SLURM_LOCALID")
        args.gpu = int(local) if local is not None else args.rank % max(torch.cuda.device_count(), 1)
    else:
        args.rank, args.world_size, args.gpu, args.distributed = 0, 1, 0, False
        setup_for_distributed(True)
        print("Not using distributed mode")
        return

    args.distributed = True
    args.dist_url = getattr(args, "dist_url", None) or "env://"
    if use_cuda:
        torch.cuda.set_device(args.gpu)
    print(f"| distributed init (rank {args.rank}/{args.world_size}, {args.dist_backend}): "
          f"{args.dist_url}, gpu {args.gpu}", flush=True)
    # Binding the group to the GPU keeps later barriers (metric sync) on the right device without warnings.
    dist.init_process_group(backend=args.dist_backend, init_method=args.dist_url, world_size=args.world_size,
                            rank=args.rank, device_id=torch.device("cuda", args.gpu) if use_cuda else None)
    if use_cuda:
        dist.barrier(device_ids=[args.gpu])
    else:
        dist.barrier()
    setup_for_distributed(args.rank == 0)


# ---------------------------------------------------------------------------------------------------
# metrics


class SmoothedValue:
    """A series of values: windowed median/average for printing, global average for the epoch summary."""

    def __init__(self, window_size=20, fmt="{median:.4f} ({global_avg:.4f})"):
        self.deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt

    def update(self, value, n=1):
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self):
        """All-reduce count and total (not the window), on the device the process group uses."""
        if not is_dist_avail_and_initialized():
            return
        tensor = torch.tensor([self.count, self.total], dtype=torch.float64, device=_comm_device())
        dist.barrier()
        dist.all_reduce(tensor)
        self.count, self.total = int(tensor[0].item()), tensor[1].item()

    @property
    def median(self):
        return torch.tensor(list(self.deque)).median().item()

    @property
    def avg(self):
        return torch.tensor(list(self.deque), dtype=torch.float32).mean().item()

    @property
    def global_avg(self):
        return self.total / self.count if self.count else float("nan")

    @property
    def max(self):
        return max(self.deque)

    @property
    def value(self):
        return self.deque[-1]

    def __str__(self):
        if not self.deque:  # e.g. only skipped (non-finite) steps so far
            return "-"
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg,
                               max=self.max, value=self.value)


def _batch_size(batch):
    """Images in a loader item ((images, targets) tuple or a tensor), None when unknown."""
    first = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    return first.shape[0] if torch.is_tensor(first) and first.dim() > 0 else None


class MetricLogger:
    """Named SmoothedValues plus a progress printer for training and evaluation loops."""

    def __init__(self, delimiter="  "):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs):
        for name, value in kwargs.items():
            if value is None:
                continue
            self.meters[name].update(value.item() if torch.is_tensor(value) else float(value))

    def __getattr__(self, attr):
        meters = self.__dict__.get("meters", {})
        if attr in meters:
            return meters[attr]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{attr}'")

    def __str__(self):
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self):
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def add_meter(self, name, meter):
        self.meters[name] = meter

    def log_every(self, iterable, print_freq, header=""):
        """Yield from `iterable`, printing meters, ETA, img/s, iteration/data time and max CUDA memory.

        Iterables without len() (generators, streaming data) are logged without a total and ETA.
        """
        total = len(iterable) if hasattr(iterable, "__len__") else None
        position = f"{{:>{len(str(total))}}}/{total}" if total is not None else "{}"
        iter_time = SmoothedValue(fmt="{avg:.4f}")
        data_time = SmoothedValue(fmt="{avg:.4f}")
        start = end = window_start = time.time()
        window_images = 0
        count = 0
        for i, obj in enumerate(iterable):
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            window_images += _batch_size(obj) or 0
            count = i + 1
            if i % print_freq == 0 or i + 1 == total:
                parts = [f"{header} [{position.format(i)}]"]
                if total is not None:
                    parts.append(f"eta: {datetime.timedelta(seconds=int(iter_time.global_avg * (total - i - 1)))}")
                parts.append(str(self))
                if window_images:
                    parts.append(f"img/s: {window_images / max(time.time() - window_start, 1e-9):.1f}")
                parts += [f"time: {iter_time}", f"data: {data_time}"]
                if torch.cuda.is_available():
                    parts.append(f"max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f}MB")
                print(self.delimiter.join(p for p in parts if p))
                window_start, window_images = time.time(), 0
            end = time.time()
        total_time = time.time() - start
        print(f"{header} Total time: {datetime.timedelta(seconds=int(total_time))} "
              f"({total_time / max(count, 1):.4f} s / it)")


# ---------------------------------------------------------------------------------------------------
# misc


AMP_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
              "fp16": torch.float16, "half": torch.float16}


def parse_amp(value):
    """--amp value -> autocast dtype, None for no autocast ("", "none", None, False)."""
    if isinstance(value, torch.dtype) or value is None:
        return value
    if value is False or str(value).strip().lower() in ("", "none", "false", "fp32", "float32"):
        return None
    try:
        return AMP_DTYPES[str(value).strip().lower()]
    except KeyError:
        raise ValueError(f"unknown mixed-precision setting {value!r}: use bfloat16, float16 or none") from None


def autocast(device, amp):
    """torch.autocast for `amp` (an --amp string or a torch.dtype) on the device's type; a no-op when off."""
    dtype = parse_amp(amp)
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def count_parameters(model, trainable_only=True):
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ---------------------------------------------------------------------------------------------------
# command-line helpers shared by the three entry points


def kwarg_pair(text):
    """argparse type for `--model-kwargs` (with action=timm.utils.ParseKwargs, which reads VALUE as a Python
    literal): a malformed pair is refused here, so argparse reports it in one line."""
    key, sep, _ = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return text


def resolve_device(args):
    """`--device` as a torch.device (this process's GPU under DDP); a clear exit when CUDA is absent."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device} asked for CUDA, which is not available here; pass --device cpu")
    if device.type == "cuda" and device.index is None and getattr(args, "distributed", False):
        device = torch.device("cuda", args.gpu)
    return device


def resolve_log_dir(args, official_default="./output_dir"):
    """TensorBoard is optional: the official default `--log_dir` turns it off with a note when absent."""
    if args.log_dir == official_default and importlib.util.find_spec("tensorboard") is None:
        print("note: tensorboard is not installed, no TensorBoard logs (pip install tensorboard)")
        args.log_dir = ""


def start_run(args):
    """The common start of a training script; returns the device.

    Distributed init, the printed arguments, the SSM backend (`--ssm-backend`), seeds (seed + rank, as
    official) and TensorBoard off when it is optional and absent. The output folder and `--resume auto`
    are runs.run_folder's.
    """
    init_distributed_mode(args)
    print("{}".format(args).replace(", ", ",\n"))
    device = resolve_device(args)
    try:
        kernels.set_backend(args.ssm_backend)
    except kernels.BackendUnavailableError as err:
        raise SystemExit(f"--ssm-backend {args.ssm_backend}: {err}") from None
    random_seed(args.seed, get_rank())
    torch.backends.cudnn.benchmark = True
    resolve_log_dir(args)
    return device


def compile_model(model, enabled):
    """`--compile`: torch.compile the model in place (nn.Module.compile).

    The object, its state_dict keys and therefore checkpoints and DDP stay as they are; call it after
    the EMA copy is made (a deep copy would share the compiled call). The first steps compile.
    """
    if enabled:
        model.compile()
    return model


def resolve_blr(args, reference_batch=256):
    """MAE/ARM lr rule: `--lr` if given, else `--blr * effective batch / 256`; prints the official lines."""
    eff_batch_size = args.batch_size * args.accum_iter * get_world_size()
    if args.lr is None:
        args.lr = args.blr * eff_batch_size / reference_batch
    print(f"base lr: {args.lr * reference_batch / eff_batch_size:.2e}")
    print(f"actual lr: {args.lr:.2e}")
    print(f"accumulate grad iterations: {args.accum_iter}")
    print(f"effective batch size: {eff_batch_size}")


def parameter_checksum_in_sync(model, device, what=""):
    """Compare a parameter checksum across ranks and print it: DDP replicas must stay identical."""
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1).to(device)
    gathered = [torch.zeros_like(checksum) for _ in range(get_world_size())]
    dist.all_gather(gathered, checksum)
    values = [float(t) for t in gathered]
    in_sync = all(v == values[0] for v in values)
    print(f"{what}parameter checksum per rank: {values} ({'in sync' if in_sync else 'RANKS DIVERGED'})")
    return in_sync
