"""Speed and memory, side by side: models against a timm reference, the SSM mixers, and the scans against
mamba-ssm's own PyTorch references.

    # what issue 9 compares: Adventurer-Base against DeiT-Base (built at the same size), bf16 autocast,
    # train = forward + backward + AdamW step, every usable SSM backend
    python benchmark.py --model adventurer_base_patch16 --img-size 224 --batch-size 64 --mode both \\
        --device cuda --dtype bfloat16 --ssm-backend all --json bench.jsonl
    python benchmark.py --level mixer --img-size 224 --batch-size 8     # Mamba2, Mamba1, Mamba1-v3 alone
    python benchmark.py --level scan --batch-size 8 --rss               # scans vs mamba-ssm's references
    python benchmark.py --quick                                          # tiny CPU smoke run

Levels: `model` (timm names of any model, `pretrain:arm_base_pz16` for the ARM pretraining model; every
model and the reference are built at --img-size), `mixer` (one mixer at --dim, the sequence length of
--img-size with 16 px patches: N+2 for Mamba2 as in Adventurer, N for Mamba1, N+1 for Mamba1-v3 as in
ARM finetuning) and `scan` (ssd_chunked / selective_scan with the mixers' shapes, each beside the
mamba-ssm reference of the same function when mamba-ssm is installed: ssd_minimal_discrete and
ssd_chunk_scan_combined_ref on inputs padded to whole 256-token chunks, selective_scan_ref).

Each row: warm-up steps first (compilation and autotuning happen there; reported as warmup_s), then the
median of --repeats timed windows of --iters steps. img_s counts images (one sequence per image at the
mixer and scan levels). ratio_to_reference is img_s over the reference's: timm's DeiT/ViT of the model's
width at the model level, the mamba-ssm reference function at the scan level. Memory: on CUDA the peak
allocated during the row (weights, gradients, AdamW state and activations); on CPU with --rss each row runs
in a fresh process and reports its peak RSS above the interpreter's (peak_mem_gib) and mem_per_img_mib,
the difference between a step at --batch-size and one at half of it divided by the batch difference:
a single-batch figure would also hold what no image adds (gradients and AdamW state, three times the
weights, allocator and oneDNN caches) and make small batches look costly. The timing and the memory of a
--rss row come from two fresh processes, the second with glibc set to hold no freed memory (STRICT_MALLOC).
"""
import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from timm.utils import ParseKwargs

from advarm import kernels, scans, ssm, utils

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": None, "fp32": None}
REFERENCES = {192: "deit_tiny_patch16_224", 384: "deit_small_patch16_224", 768: "deit_base_patch16_224",
              1024: "vit_large_patch16_224"}  # timm's DeiT/ViT of each width
QUICK = dict(device="cpu", dtype="float32", model="adventurer_tiny_patch16,arm_base_pz16", img_size=32, batch_size=2,
             depth=1, reference="deit_tiny_patch16_224", repeats=1, iters=1, warmup=1, dim=64)
MIXERS = ("Mamba2", "Mamba1", "Mamba1-v3")
SCANS = {  # our scan -> the mamba-ssm references of the same function (the first one is its ratio reference)
    "ssd_chunked": ("mamba_ssm:ssd_minimal_discrete", "mamba_ssm:ssd_chunk_scan_combined_ref"),
    "selective_scan": ("mamba_ssm:selective_scan_ref",),
    "selective_scan-v3": ("mamba_ssm:selective_scan_ref-v3",),
}


def get_args_parser():
    parser = argparse.ArgumentParser("Speed and memory of models, SSM mixers and scans", add_help=True)
    parser.add_argument("--level", default="model", choices=["model", "mixer", "scan"])
    parser.add_argument("--model", "--models", dest="model", default="adventurer_base_patch16",
                        help="NAME[,NAME...]: timm names, or pretrain:arm_base_pz16 (model level)")
    parser.add_argument("--img-size", type=int, default=224, help="every model and the reference are built at it")
    parser.add_argument("--batch-size", "--batch", dest="batch_size", type=int, default=64)
    parser.add_argument("--mode", default="both", choices=["train", "infer", "both"],
                        help="train: forward + backward + AdamW step; infer: eval-mode forward without autograd")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                        help="bfloat16/float16: autocast with float32 weights, as in training (default: bfloat16 "
                             "on CUDA, float32 on CPU)")
    parser.add_argument("--ssm-backend", default="all", choices=["all", *kernels.BACKENDS],
                        help="all: every backend usable here")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model (utils.compile_model)")
    parser.add_argument("--reference", default=None,
                        help="timm model to compare with (default: the DeiT/ViT of the model's width; none: skip)")
    parser.add_argument("--json", default="", help="append one JSON line per measurement to this file")
    parser.add_argument("--repeats", type=int, default=5, help="timed windows (the median is reported)")
    parser.add_argument("--iters", type=int, default=None, help="steps per window (default 10 on CUDA, 2 on CPU)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, autotuning)")
    parser.add_argument("--rss", action="store_true",
                        help="CPU memory: each row timed in a fresh process and measured in another, peak RSS "
                             "and memory per image")
    parser.add_argument("--dim", type=int, default=768, help="mixer/scan width (768: Adventurer-Base, ARM-Base)")
    parser.add_argument("--lengths", default="", help="mixer/scan sequence lengths instead of the --img-size ones")
    parser.add_argument("--depth", type=int, default=None, help="override every model's depth (smoke runs)")
    parser.add_argument("--model-kwargs", nargs="*", default={}, type=utils.kwarg_pair, action=ParseKwargs,
                        metavar="KEY=VALUE",
                        help="constructor overrides for the --model models (not the reference)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--quick", action="store_true", help=f"tiny CPU smoke run: {QUICK}")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)  # one row in a fresh process (--rss)
    return parser


@dataclass
class Case:
    """One row: `model` (a model, mixer or scan) at `level`, run with `backend` in `mode`; `reference` names
    the row its ratio is taken to."""
    level: str
    model: str
    backend: str
    mode: str
    reference: str = ""
    seq_len: int = 0


# ---------------------------------------------------------------------------------------------------
# what is measured


def build_model(name, args, is_reference=False):
    import timm

    import models_adventurer  # noqa: F401  (register the models with timm)
    import models_arm
    kwargs = {} if is_reference else dict(args.model_kwargs)
    if args.depth is not None:
        kwargs["depth"] = args.depth
    if name.startswith("pretrain:"):
        return models_arm.create_pretrain_model(name.split(":", 1)[1], img_size=args.img_size, **kwargs)
    return timm.create_model(name, img_size=args.img_size, **kwargs)


def on_meta(name, args):
    """The model built on the meta device (free), or None where it cannot be built (measure says why)."""
    try:
        with torch.device("meta"):
            return build_model(name, args)
    except Exception:
        return None


def model_width(name, args):
    return getattr(on_meta(name, args), "embed_dim", None)


def mixer_of(name, args):
    """'Mamba2' or 'Mamba1': the mixer whose kernels the model runs on (None: no SSM)."""
    model = on_meta(name, args)
    kinds = {type(m).__name__ for m in model.modules() if isinstance(m, (ssm.Mamba1, ssm.Mamba2))} if model else ()
    return next(iter(kinds), None)


TOKENS_BEYOND_PATCHES = {"Mamba2": 2, "Mamba1": 0, "Mamba1-v3": 1,  # Adventurer: avg + cls; ARM v3: cls
                         "ssd_chunked": 2, "selective_scan": 0, "selective_scan-v3": 1}


def seq_lengths(subject, args):
    """Mixer/scan sequence lengths: --lengths, else the one --img-size gives with 16 px patches."""
    if args.lengths:
        return [int(v) for v in args.lengths.split(",")]
    return [(args.img_size // 16) ** 2 + TOKENS_BEYOND_PATCHES[subject]]


def usable_backends(requested, mixer, device):
    """The backends to measure a model or mixer using `mixer` ('Mamba2', 'Mamba1' or None) with."""
    if requested != "all":
        return [requested]
    found = ["torch"]
    if mixer and device.type == "cuda" and kernels.available_backends()[f"mamba_ssm:{mixer}"] is None:
        found.append("mamba_ssm")
    return found


def plan(args, device):
    """Every row to measure, references first."""
    modes = ["train", "infer"] if args.mode == "both" else [args.mode]
    cases = []
    if args.level == "model":
        references = {}
        for name in args.models:
            ref = args.reference or REFERENCES.get(model_width(name, args), "")
            references[name] = "" if ref.lower() == "none" else ref
        for mode in modes:
            for ref in dict.fromkeys(r for r in references.values() if r):
                cases.append(Case("model", ref, "-", mode, reference=ref))
            for name in args.models:
                for backend in usable_backends(args.ssm_backend, mixer_of(name, args), device):
                    cases.append(Case("model", name, backend, mode, reference=references[name]))
    elif args.level == "mixer":
        for subject in MIXERS:
            for length in seq_lengths(subject, args):
                for mode in modes:
                    for backend in usable_backends(args.ssm_backend, subject.split("-")[0], device):
                        cases.append(Case("mixer", subject, backend, mode, seq_len=length))
    else:
        for ours, refs in SCANS.items():
            for length in seq_lengths(ours, args):
                for mode in modes:
                    for subject in (*refs, ours):
                        cases.append(Case("scan", subject, "torch", mode, reference=refs[0], seq_len=length))
    return cases


def mamba_ssm_reference(name):
    """mamba-ssm's pure-PyTorch reference function `name`, or raise Skip saying why not."""
    if importlib.util.find_spec("mamba_ssm") is None:
        raise Skip("mamba-ssm is not installed")
    if name == "selective_scan_ref":  # its module imports the CUDA extension at load time (mamba-ssm <= 2.3)
        stand_in = importlib.util.find_spec("selective_scan_cuda") is None
        if stand_in:
            sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")
        try:
            return kernels.import_bypassing_init("mamba_ssm", "ops.selective_scan_interface").selective_scan_ref
        finally:
            if stand_in:
                del sys.modules["selective_scan_cuda"]
    if name == "ssd_minimal_discrete":
        return kernels.import_bypassing_init("mamba_ssm", "modules.ssd_minimal").ssd_minimal_discrete
    return kernels.import_bypassing_init("mamba_ssm", "ops.triton.ssd_combined").ssd_chunk_scan_combined_ref


class Skip(Exception):
    """This row cannot run here; the message says why."""


def scan_workload(case, args, device):
    """(function, make_inputs(batch)) of one scan row, with Adventurer-/ARM-Base shapes at --dim."""
    length, dim, chunk = case.seq_len, args.dim, 256
    name = case.model.split(":")[-1]
    if name.startswith("ssd"):
        nheads = 2 * dim // 64

        def make_inputs(batch):
            g = torch.Generator(device).manual_seed(0)
            x = torch.randn(batch, length, nheads, 64, device=device, generator=g)
            dt = F.softplus(torch.randn(batch, length, nheads, device=device, generator=g) - 3)
            A = -torch.rand(nheads, device=device, generator=g) * 15 - 1
            B, C = torch.randn(2, batch, length, 1, 64, device=device, generator=g)
            if name == "ssd_chunked":
                return [x, dt, A, B, C]
            pad = (0, 0, 0, 0, 0, -length % chunk)  # the references take whole chunks only
            x, dt, B, C = F.pad(x, pad), F.pad(dt, pad[2:]), F.pad(B, pad), F.pad(C, pad)
            if name == "ssd_minimal_discrete":  # takes x * dt, A * dt and per-head B, C
                return [x * dt[..., None], dt * A, B.expand(-1, -1, nheads, -1), C.expand(-1, -1, nheads, -1)]
            return [x, dt, A, B, C]
        if name == "ssd_chunked":
            return (lambda *t: scans.ssd_chunked(*t, chunk_size=chunk)), make_inputs
        ref = mamba_ssm_reference(name)
        if name == "ssd_minimal_discrete":
            return (lambda *t: ref(*t, block_len=chunk)[0]), make_inputs
        return (lambda *t: ref(*t, chunk_size=chunk)), make_inputs
    groups = 4 if name.endswith("-v3") else 1  # v3: the four directions stacked along channels, one B/C each
    channels = groups * dim

    def make_inputs(batch):
        g = torch.Generator(device).manual_seed(0)
        u, delta, z = torch.randn(3, batch, channels, length, device=device, generator=g)
        A = -torch.arange(1, 17.0, device=device).repeat(channels, 1)
        B, C = torch.randn(2, batch, groups, 16, length, device=device, generator=g)
        D, delta_bias = torch.ones(channels, device=device), torch.full((channels,), -4.0, device=device)
        return [u, 0.1 * delta, A, B, C, D, z, delta_bias]
    if name.startswith("selective_scan_ref"):
        ref = mamba_ssm_reference("selective_scan_ref")
        return (lambda u, d, A, B, C, D, z, b: ref(u, d, A, B, C, D, z=z, delta_bias=b, delta_softplus=True)), make_inputs
    return (lambda u, d, A, B, C, D, z, b: scans.selective_scan(u, d, A, B, C, D, z=z, delta_bias=b)), make_inputs


def workload(case, args, device):
    """(callable, parameters, make_inputs(batch) -> tensors, loss(output, inputs)) of one row."""
    if case.level == "scan":
        fn, make_inputs = scan_workload(case, args, device)
        return fn, [], make_inputs, lambda out, inputs: out.float().sum()
    if case.level == "mixer":
        torch.manual_seed(0)
        module = (ssm.Mamba2(args.dim) if case.model == "Mamba2" else
                  ssm.Mamba1(args.dim, bimamba_type="v3" if case.model.endswith("v3") else "none")).to(device)

        def make_inputs(batch):
            return [torch.randn(batch, case.seq_len, args.dim, device=device)]
        return module, list(module.parameters()), make_inputs, lambda out, inputs: out.float().square().mean()
    torch.manual_seed(0)
    model = build_model(case.model, args, is_reference=case.model == case.reference).to(device)
    utils.compile_model(model, args.compile)

    def make_inputs(batch):
        return [torch.randn(batch, 3, args.img_size, args.img_size, device=device)]

    def loss(out, inputs):  # classifiers: cross-entropy on fixed labels; the ARM pretraining model: its loss
        if out.dim() == 2 and out.shape[0] == inputs[0].shape[0]:
            labels = torch.arange(out.shape[0], device=out.device) % out.shape[1]
            return F.cross_entropy(out.float(), labels)
        return out.float().mean()
    return model, list(model.parameters()), make_inputs, loss


def make_stepper(case, args, device):
    """make_step(batch) -> step(): one training or inference step of the row at that batch size."""
    call, params, make_inputs, loss_of = workload(case, args, device)
    amp_dtype = DTYPES[args.dtype]
    train = case.mode == "train"
    if isinstance(call, torch.nn.Module):
        call.train(train)
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05) if train and params else None
    scaler = torch.amp.GradScaler(device.type, enabled=train and amp_dtype == torch.float16)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()

    def make_step(batch):
        inputs = make_inputs(batch)
        if not train:
            def infer():
                with torch.inference_mode(), autocast():
                    call(*inputs)
            return infer
        leaves = [t.requires_grad_() for t in inputs if t.is_floating_point()] if not params else []

        def train_step():
            with autocast():
                out = call(*inputs)
            scaler.scale(loss_of(out, inputs)).backward()
            if optimizer is not None:
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
            for t in leaves:
                t.grad = None
        return train_step
    return make_step


# ---------------------------------------------------------------------------------------------------
# measuring one row

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss(field="VmRSS"):
    """Resident memory of this process in bytes: now (VmRSS) or its peak since the last reset (VmHWM)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))


def reset_peak_rss():
    """Start a new peak (Linux: writing 5 to clear_refs sets VmHWM to the current RSS), so that import-time
    peaks do not hide the step's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# glibc settings of the process that measures peak RSS: one arena, and every block of 128 KiB or more mapped
# on its own and unmapped when freed. By default each thread keeps an arena and glibc raises its mmap
# threshold after the first large free, so the peak would count what the allocator retained: ARM-Base's
# memory per image read anywhere from 80 to 216 MiB in runs of one command; with these, 114.5 and 114.7.
STRICT_MALLOC = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def measure(case, args, timed=True):
    """The row's timings (unless not timed) and memory, in this process."""
    device = torch.device(args.device)
    row = dict(asdict(case), img_s=None, ratio_to_reference=None, peak_mem_gib=None, mem_per_img_mib=None)
    rss_start = rss() if args.rss else None
    try:
        kernels.set_backend("auto" if case.backend in ("-", "all") else case.backend)
        torch._dynamo.reset()  # a compiled graph bakes in the backend choice
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        make_step = make_stepper(case, args, device)
        half = max(1, args.batch_size // 2)
        step = make_step(args.batch_size)
        start = time.perf_counter()
        for _ in range(max(args.warmup, int(args.rss))):  # memory: AdamW's state exists before the peaks
            step()
        synchronize(device)
        warmup_s = time.perf_counter() - start
        windows = []
        for _ in range(args.repeats if timed else 0):
            start = time.perf_counter()
            for _ in range(args.iters):
                step()
            synchronize(device)
            windows.append(time.perf_counter() - start)
        if args.rss:
            peaks = {}
            for batch in (half, args.batch_size):  # half: what any batch needs (gradients, AdamW state)
                reset_peak_rss()
                make_step(batch)()
                peaks[batch] = rss("VmHWM")
    except Skip as exc:
        return dict(row, skipped=str(exc))
    except Exception as exc:  # out of memory, a model that cannot be built at this size, a kernel that failed
        return dict(row, skipped=f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}")
    finally:
        kernels.set_backend("auto")
    if timed:
        seconds = statistics.median(windows) / args.iters
        row.update(img_s=args.batch_size / seconds, ms_per_step=1000 * seconds, warmup_s=warmup_s,
                   windows_s=[round(w, 6) for w in windows])
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    elif args.rss:
        row["peak_mem_gib"] = (peaks[args.batch_size] - rss_start) / 2**30
        if args.batch_size > half:
            row["mem_per_img_mib"] = (peaks[args.batch_size] - peaks[half]) / (args.batch_size - half) / 2**20
    return row


def measure_in_fresh_process(case, args):
    """`measure` in new interpreters, so that the peak RSS belongs to this row alone: one times the row with
    the allocator's usual settings, another measures its memory under STRICT_MALLOC."""
    row = None
    for timed in (True, False):
        spec = json.dumps(dict(args=dict(vars(args), rss=not timed), case=asdict(case), timed=timed))
        env = dict(os.environ) if timed else dict(os.environ, **STRICT_MALLOC)
        done = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True, text=True, env=env)
        lines = [line for line in done.stdout.splitlines() if line.startswith("ROW ")]
        if done.returncode or not lines:
            why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            return dict(asdict(case), img_s=None, ratio_to_reference=None, peak_mem_gib=None, mem_per_img_mib=None,
                        skipped=f"fresh process failed: {why}")
        result = json.loads(lines[-1][4:])
        if result.get("skipped"):
            return result
        if row is None:
            row = result
        else:
            row.update(peak_mem_gib=result["peak_mem_gib"], mem_per_img_mib=result["mem_per_img_mib"])
    return row


def environment(args):
    device = torch.device(args.device)
    versions = {"torch": torch.__version__, **kernels.versions()}
    for package in ("timm", "triton"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return dict(device=device.type, gpu_name=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(), dtype=args.dtype,
                batch=args.batch_size, img_size=args.img_size, compiled=args.compile, iters=args.iters,
                repeats=args.repeats, warmup=args.warmup,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **versions)


def add_ratios(rows):
    """ratio_to_reference: img_s over the same-mode img_s of the row's reference."""
    speeds = {(r["level"], r["model"], r["mode"], r["seq_len"]): r["img_s"] for r in rows}
    for row in rows:
        ref = speeds.get((row["level"], row["reference"], row["mode"], row["seq_len"]))
        if ref and row["img_s"]:
            row["ratio_to_reference"] = row["img_s"] / ref


def print_table(rows, env):
    print(f"\n{env['gpu_name'] or env['cpu']} ({env['device']}, {env['threads']} threads), {env['dtype']}, "
          f"batch {env['batch']}, {env['img_size']} px, compiled {env['compiled']}; torch {env['torch']}, "
          f"timm {env['timm']}, mamba_ssm {env['mamba_ssm']}, causal_conv1d {env['causal_conv1d']}")
    print(f"{'model':38s} {'backend':9s} {'mode':5s} {'len':>5s} {'img/s':>9s} {'ratio':>6s} {'peak GiB':>9s} "
          f"{'MiB/img':>8s} {'warm-up s':>9s}")

    def num(value, spec):
        return "-" if value is None else format(value, spec)
    for r in rows:
        head = f"{r['model']:38s} {r['backend']:9s} {r['mode']:5s} {num(r['seq_len'] or None, 'd'):>5s}"
        if r.get("skipped"):
            print(f"{head} skipped: {r['skipped']}")
            continue
        print(f"{head} {r['img_s']:9.1f} {num(r['ratio_to_reference'], '.2f'):>6s} "
              f"{num(r['peak_mem_gib'], '.2f'):>9s} {num(r['mem_per_img_mib'], '.1f'):>8s} {r['warmup_s']:9.1f}")


def check_args(args):
    """One clear line for bad input instead of a traceback later."""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False here")
    if min(args.batch_size, args.repeats, args.iters, args.img_size) < 1 or args.warmup < 0:
        raise SystemExit("--batch-size, --repeats, --iters and --img-size must be >= 1, --warmup >= 0")
    if args.rss and args.device != "cpu":
        raise SystemExit("--rss measures CPU memory; on CUDA the peak allocated memory is always reported")
    if args.rss and not os.access("/proc/self/clear_refs", os.W_OK):
        raise SystemExit("--rss reads the peak RSS from Linux's /proc/self (status, clear_refs), absent here")
    if args.ssm_backend == "mamba_ssm":
        try:
            kernels.set_backend("mamba_ssm")
        except kernels.BackendUnavailableError as exc:
            raise SystemExit(f"--ssm-backend mamba_ssm: {exc}") from None
        finally:
            kernels.set_backend("auto")
    try:
        [int(v) for v in args.lengths.split(",") if v]
    except ValueError:
        raise SystemExit(f"--lengths must be comma-separated integers, got {args.lengths!r}") from None
    if args.level == "model":
        import timm

        import models_adventurer  # noqa: F401
        import models_arm
        for name in args.models + ([args.reference] if args.reference and args.reference != "none" else []):
            known = name.split(":", 1)[1] in models_arm.MODEL_CONFIGS if name.startswith("pretrain:") \
                else timm.is_model(name)
            if not known:
                raise SystemExit(f"--model/--reference {name}: not a timm model name (nor pretrain:arm_*_pz16)")


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.child:  # one row, in the fresh process `measure_in_fresh_process` started
        spec = json.loads(args.child)
        args = argparse.Namespace(**spec["args"])
        if args.threads:
            torch.set_num_threads(args.threads)
        print("ROW " + json.dumps(measure(Case(**spec["case"]), args, spec["timed"])), flush=True)
        return []
    if args.quick:  # quick values replace the defaults, explicit flags still win
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    args.iters = args.iters or (10 if args.device.startswith("cuda") else 2)
    args.models = [m for m in args.model.split(",") if m]
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(args)
    rows = []
    for case in plan(args, torch.device(args.device)):
        row = measure_in_fresh_process(case, args) if args.rss else measure(case, args)
        rows.append(row)
        status = row.get("skipped") or f"{row['img_s']:.1f} img/s"
        print(f"  {case.model} {case.backend} {case.mode}: {status}", flush=True)
    for row in rows:
        row.update(env)
    add_ratios(rows)
    print_table(rows, env)
    if args.json:
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        print(f"appended {len(rows)} lines to {args.json}")
    return rows


if __name__ == "__main__":
    main()
