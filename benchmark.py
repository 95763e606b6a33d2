"""Speed and memory of the SSM mixers (and optionally whole models) for each usable backend.

Measures forward (eval, no grad) and forward+backward (train) time and peak memory of Mamba2
(Adventurer), Mamba1 unidirectional (ARM pretraining) and Mamba1 "v3" (ARM finetuning), on the current
device, for the "torch" backend and, on CUDA with the kernels installed, "mamba_ssm". Whole models are
built through timm after importing models_adventurer / models_arm (names: any of their registered
models, `name@img_size` for another input size, `pretrain:arm_base_pz16` for the ARM pretraining model).

    python3 benchmark.py --quick                        # CPU smoke run, well under a minute
    python3 benchmark.py --dtype bf16 --batch 64 --models adventurer_base_patch16,arm_base_pz16 --out bench.json

Peak memory is reported on CUDA only (torch has no per-call allocator statistics on the CPU).
"""
import argparse
import json
import statistics
import time
from contextlib import nullcontext

import torch

from advarm import kernels, ssm

QUICK = dict(dim=64, batch=2, lengths="65", repeats=2, models="adventurer_tiny_patch16@64,arm_base_pz16@64",
             depth=2, threads=1)


def get_args_parser():
    parser = argparse.ArgumentParser("SSM mixer / model benchmark", add_help=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                        help="bf16 = autocast with fp32 master weights, as in the official runs")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lengths", default="197,577",
                        help="comma-separated mixer sequence lengths (v3 needs square+1: 197 = 14*14+1, 577 = 24*24+1)")
    parser.add_argument("--dim", type=int, default=768, help="mixer width (768 = Adventurer-Base / ARM-Base)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs after one warm-up (median reported)")
    parser.add_argument("--models", default="", help="comma-separated model names to time as a whole")
    parser.add_argument("--depth", type=int, default=None, help="override the models' depth (for small smoke runs)")
    parser.add_argument("--backends", default="torch,mamba_ssm", help="backends to try where usable")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (torch.set_num_threads); 1 keeps CPU timings stable on a busy machine")
    parser.add_argument("--quick", action="store_true", help=f"small CPU-friendly defaults: {QUICK}")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    return parser


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device, repeats):
    """Median milliseconds over `repeats` runs after a warm-up, and peak extra CUDA memory in MiB."""
    fn()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated(device) - baseline) / 2**20 if device.type == "cuda" else None
    return statistics.median(times) * 1000, peak


def forward_and_train_step(module, make_input, device, amp_dtype, repeats):
    """(forward ms, forward+backward ms, forward peak MiB, forward+backward peak MiB) of one module."""
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    inputs = make_input()
    params = [p for p in module.parameters() if p.requires_grad]

    def forward():
        with torch.no_grad(), autocast:
            module(inputs)

    def train_step():
        for p in params:
            p.grad = None
        with autocast:
            out = module(inputs)
        out.float().mean().backward()

    module.eval()
    fwd_ms, fwd_mem = measure(forward, device, repeats)
    module.train()
    step_ms, step_mem = measure(train_step, device, repeats)
    return fwd_ms, step_ms, fwd_mem, step_mem


def usable_backends(requested, device):
    """{backend: {mixer: None if usable else why}}; kernels are only probed on CUDA (the probe is slow)."""
    status = kernels.available_backends() if device.type == "cuda" else {}
    usable = {}
    for backend in requested:
        if backend == "torch":
            usable[backend] = {"Mamba2": None, "Mamba1": None}
        elif backend == "mamba_ssm":
            usable[backend] = {m: (status.get(f"mamba_ssm:{m}") if device.type == "cuda"
                                   else f"needs CUDA, device is {device.type}") for m in ("Mamba2", "Mamba1")}
        else:
            raise SystemExit(f"unknown backend {backend!r}; choose from torch, mamba_ssm")
    return usable


def mixer_cases(args, device):
    """(name, mixer class tag, factory, sequence length) for every requested length."""
    cases = []
    for length in args.lengths:
        cases.append(("Mamba2", "Mamba2", lambda: ssm.Mamba2(args.dim, device=device), length))
        cases.append(("Mamba1", "Mamba1", lambda: ssm.Mamba1(args.dim, device=device), length))
        side = int((length - 1) ** 0.5)
        if side * side == length - 1:
            cases.append(("Mamba1-v3", "Mamba1", lambda: ssm.Mamba1(args.dim, bimamba_type="v3", device=device),
                          length))
    return cases


def build_model(spec, depth):
    """A whole model from `name[@img_size]` or `pretrain:name`; returns (model, image size)."""
    import timm

    import models_adventurer  # noqa: F401  (registers the Adventurer names with timm)
    import models_arm

    overrides = {} if depth is None else {"depth": depth}
    if spec.startswith("pretrain:"):
        return models_arm.create_pretrain_model(spec.split(":", 1)[1], **overrides), 192
    name, _, size = spec.partition("@")
    if size:
        overrides["img_size"] = int(size)
    model = timm.create_model(name, **overrides)
    return model, int(size) if size else model.pretrained_cfg["input_size"][-1]


def run(args):
    device = torch.device(args.device)
    amp_dtype = torch.bfloat16 if args.dtype == "bf16" else None
    backends = usable_backends(args.backends.split(","), device)
    results = []

    def record(subject, backend, shape, module, make_input):
        row = dict(subject=subject, backend=backend, shape=shape)
        try:
            kernels.set_backend(backend)
            timings = forward_and_train_step(module, make_input, device, amp_dtype, args.repeats)
            row.update(zip(("forward_ms", "train_step_ms", "forward_peak_mib", "train_step_peak_mib"), timings))
        except torch.cuda.OutOfMemoryError:
            row["skipped"] = "out of memory"
        except kernels.BackendUnavailableError as exc:  # e.g. a model whose Mamba1 has no kernel here
            row["skipped"] = str(exc)
        finally:
            kernels.set_backend("auto")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        results.append(row)
        print_row(row)

    print_header(device, args)
    for name, mixer, factory, length in mixer_cases(args, device):
        for backend, per_mixer in backends.items():
            shape = f"B={args.batch} L={length} C={args.dim}"
            if per_mixer[mixer]:
                results.append(dict(subject=name, backend=backend, shape=shape, skipped=per_mixer[mixer]))
                print_row(results[-1])
                continue
            torch.manual_seed(0)
            module = factory()
            record(name, backend, shape, module,
                   lambda: torch.randn(args.batch, length, args.dim, device=device, requires_grad=True))
            del module
    for spec in args.models:
        try:
            model, img_size = build_model(spec, args.depth)
        except Exception as exc:  # a missing or failing model module must not hide the mixer numbers
            results.append(dict(subject=spec, backend="-", shape="-", skipped=f"{type(exc).__name__}: {exc}"))
            print_row(results[-1])
            continue
        model.to(device)
        for backend, per_mixer in backends.items():
            if all(per_mixer.values()):
                continue
            torch.manual_seed(0)
            record(spec, backend, f"B={args.batch} {img_size}px", model,
                   lambda: torch.randn(args.batch, 3, img_size, img_size, device=device))
        del model
    return results


def print_header(device, args):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, dtype {args.dtype}, torch {torch.__version__}, median of {args.repeats} runs")
    print(f"{'subject':28s} {'backend':10s} {'shape':22s} {'fwd ms':>9s} {'fwd+bwd ms':>11s} "
          f"{'fwd MiB':>9s} {'f+b MiB':>9s}")


def print_row(row):
    def num(key):
        value = row.get(key)
        return "-" if value is None else f"{value:.1f}"
    if "skipped" in row:
        print(f"{row['subject']:28s} {row['backend']:10s} {row['shape']:22s} skipped: {row['skipped']}")
    else:
        print(f"{row['subject']:28s} {row['backend']:10s} {row['shape']:22s} {num('forward_ms'):>9s} "
              f"{num('train_step_ms'):>11s} {num('forward_peak_mib'):>9s} {num('train_step_peak_mib'):>9s}")


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.quick:  # quick values replace the defaults, explicit flags still win
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    try:
        args.lengths = [int(v) for v in str(args.lengths).split(",") if v]
    except ValueError:
        raise SystemExit(f"--lengths must be comma-separated integers, got {args.lengths!r}")
    args.models = [m for m in args.models.split(",") if m]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    results = run(args)
    if args.out:
        payload = dict(device=args.device, dtype=args.dtype, batch=args.batch, repeats=args.repeats,
                       torch=torch.__version__, results=results)
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
