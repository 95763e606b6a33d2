"""Which SSM implementation runs: discovery of the optional mamba-ssm / causal-conv1d kernels and the
backend choice.

Two backends compute the same function:
* "torch": plain PyTorch (`advarm.scans`), runs anywhere, differentiable, state math in float32.
* "mamba_ssm": the official fused CUDA/Triton kernels, used only for CUDA tensors.
"auto" (the default; env var SSM_BACKEND overrides it, `set_backend` overrides both) takes the kernels
when they can run on the given tensors and the torch path otherwise. mamba_ssm is imported lazily on
first use, with its package `__init__` bypassed: that file imports the CUDA extension, which a
Triton-only install (MAMBA_SKIP_CUDA_BUILD=TRUE up to 2.3.2.post1; the default after it, whose source
builds the extension only with MAMBA_KEEP_CUDA_BUILD=TRUE) lacks although the Triton SSD kernels work.
The compiled extensions (`selective_scan_cuda`, `causal_conv1d_cuda`) are probed themselves: after
2.3.2.post1, selective_scan_fn imports without its extension and fails only when called.

The choice depends only on the mixer, the device type and the installed kernels, so it is made once
per call site and is a constant for torch.compile (no graph break, no host sync in the blocks).

    python -m advarm      # which backends are usable here and, for each missing one, why
"""
import importlib
import importlib.metadata
import importlib.util
import os
import sys
import types
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

__all__ = ["BACKENDS", "BackendUnavailableError", "set_backend", "get_backend", "available_backends", "kernels_for",
           "causal_conv1d_layout", "split_conv1d_scan_accepts", "import_bypassing_init", "versions", "report"]

BACKENDS = ("auto", "torch", "mamba_ssm")
INSTALL_HINT = ("MAMBA_KEEP_CUDA_BUILD=TRUE pip install causal-conv1d mamba-ssm --no-build-isolation  "
                "(on a machine with CUDA and nvcc)")


class BackendUnavailableError(RuntimeError):
    """The requested SSM backend cannot run here; the message says why and what to install."""


@dataclass
class _Kernels:
    """The mamba-ssm / causal-conv1d entry points that could be imported, and why others could not."""
    split_conv1d_scan: Optional[Callable] = None  # Mamba2 fully fused (needs causal_conv1d's CUDA ext)
    chunk_scan: Optional[Callable] = None  # Mamba2 Triton SSD
    selective_scan: Optional[Callable] = None  # Mamba1 CUDA selective scan
    causal_conv1d: Optional[Callable] = None
    problems: dict = field(default_factory=dict)


def import_bypassing_init(package: str, submodule: str):
    """Import `package.submodule` without running `package/__init__.py` (which may import a CUDA ext)."""
    if package not in sys.modules:
        spec = importlib.util.find_spec(package)
        stub = types.ModuleType(package)
        stub.__path__ = list(spec.submodule_search_locations)
        stub.__spec__ = spec
        sys.modules[package] = stub
    return importlib.import_module(f"{package}.{submodule}")


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _import_extension(name: str) -> Optional[str]:
    """None if the compiled module `name` imports, else why not (absent, or present but unloadable)."""
    if importlib.util.find_spec(name) is None:
        return f"its CUDA extension {name} is not installed"
    try:
        importlib.import_module(name)
    except Exception as exc:  # e.g. an undefined symbol: built against another torch
        return f"its CUDA extension {name} does not load ({_error_text(exc)})"
    return None


def _probe() -> _Kernels:
    """Import the kernels; records, per missing piece, whether it is not installed or failed."""
    found = _Kernels()
    if importlib.util.find_spec("causal_conv1d") is None:
        found.problems["causal_conv1d"] = "not installed"
    elif why := _import_extension("causal_conv1d_cuda"):
        found.problems["causal_conv1d"] = why
    else:
        try:  # its __init__ only re-exports the interface, which needs the CUDA extension anyway
            found.causal_conv1d = importlib.import_module("causal_conv1d").causal_conv1d_fn
        except Exception as exc:
            found.problems["causal_conv1d"] = f"import failed ({_error_text(exc)})"
    if importlib.util.find_spec("mamba_ssm") is None:
        found.problems["mamba_ssm"] = "not installed"
        return found
    try:
        ssd = import_bypassing_init("mamba_ssm", "ops.triton.ssd_combined")
        found.chunk_scan = ssd.mamba_chunk_scan_combined
        # 2.3.x names the fused path's conv entry causal_conv1d_fwd_function, 2.2.x causal_conv1d_cuda
        conv_entry = getattr(ssd, "causal_conv1d_fwd_function", None) or getattr(ssd, "causal_conv1d_cuda", None)
        if conv_entry is not None and found.causal_conv1d is not None:
            found.split_conv1d_scan = ssd.mamba_split_conv1d_scan_combined
    except Exception as exc:
        found.problems["mamba_ssm Triton SSD (Mamba2)"] = f"import failed ({_error_text(exc)})"
    if why := _import_extension("selective_scan_cuda"):
        found.problems["mamba_ssm selective_scan_cuda (Mamba1)"] = (
            f"{why}; mamba-ssm after 2.3.2.post1 builds it only with MAMBA_KEEP_CUDA_BUILD=TRUE")
        return found
    try:
        found.selective_scan = import_bypassing_init("mamba_ssm", "ops.selective_scan_interface").selective_scan_fn
    except Exception as exc:
        found.problems["mamba_ssm selective_scan_cuda (Mamba1)"] = f"import failed ({_error_text(exc)})"
    return found


_found: Optional[_Kernels] = None


def _kernels() -> _Kernels:
    """The kernels, probed once per process."""
    global _found
    if _found is None:
        _found = _probe()
    return _found


def causal_conv1d_layout(x: torch.Tensor) -> torch.Tensor:
    """x (b, d, l) in a layout causal-conv1d's CUDA kernel accepts.

    The kernel takes channel-first rows (stride(2) == 1) of any width, but a channel-last view (such as
    a slice of in_proj's output, transposed) only when d, stride(0) and stride(2) are multiples of 8;
    any other view is copied to channel-first.
    """
    if x.stride(2) == 1:
        return x
    if x.stride(1) == 1 and x.shape[1] % 8 == 0 and x.stride(0) % 8 == 0 and x.stride(2) % 8 == 0:
        return x
    return x.contiguous()


def split_conv1d_scan_accepts(zxbcdt_width: int, conv_dim: int) -> bool:
    """Whether mamba_split_conv1d_scan_combined can run: it passes a channel-last slice of zxbcdt to
    causal-conv1d, so the conv channels and zxbcdt's width (that slice's row stride, which mamba-ssm
    < 2.3 does not copy first) must be multiples of 8. False for small widths such as embed_dim 64."""
    return zxbcdt_width % 8 == 0 and conv_dim % 8 == 0


def _mixer_kernel_problem(mixer: str, kernels: _Kernels) -> Optional[str]:
    """Why `mixer` has no kernel on this install (None when it has one); CUDA is checked separately."""
    if "mamba_ssm" in kernels.problems:
        return f"mamba_ssm is {kernels.problems['mamba_ssm']}"
    needed = kernels.chunk_scan if mixer == "Mamba2" else kernels.selective_scan
    if needed is None:
        return "; ".join(f"{k}: {v}" for k, v in kernels.problems.items() if mixer in k)
    return None


_backend_override: Optional[str] = None
_announced: set = set()


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown SSM backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def get_backend() -> str:
    """The backend asked for: set_backend(), else env var SSM_BACKEND, else "auto"."""
    if _backend_override is not None:
        return _backend_override
    return _check_name(os.environ.get("SSM_BACKEND", "auto").strip().lower() or "auto")


def set_backend(name: str) -> None:
    """Choose "auto", "torch" or "mamba_ssm"; "mamba_ssm" raises BackendUnavailableError if unusable here."""
    global _backend_override
    _check_name(name)
    if name == "mamba_ssm":
        problems = {m: _unavailable_reason(m, None) for m in ("Mamba2", "Mamba1")}
        if all(problems.values()):
            raise BackendUnavailableError(_unavailable_message(problems))
    _backend_override = name


def _unavailable_reason(mixer: str, device_type: Optional[str]) -> Optional[str]:
    """Why the kernels cannot run `mixer` on tensors of `device_type` (None: on this machine at all)."""
    if device_type is not None and device_type != "cuda":  # decided without importing anything
        return f"the tensors are on {device_type}; the kernels need CUDA tensors"
    reasons = [_mixer_kernel_problem(mixer, _kernels())]
    if device_type is None and not torch.cuda.is_available():
        reasons.insert(0, "no CUDA device (torch.cuda.is_available() is False)")
    return "; ".join(r for r in reasons if r) or None


def _unavailable_message(problems: dict) -> str:
    reasons = "; ".join(f"{mixer}: {why}" for mixer, why in problems.items() if why)
    return f"SSM backend 'mamba_ssm' cannot run ({reasons}). Install the kernels with `{INSTALL_HINT}`."


def _announce(mixer: str, backend: str, why: str = "") -> None:
    """Say once per (mixer, backend) which implementation runs, on rank 0 only."""
    if (mixer, backend) in _announced:
        return
    _announced.add((mixer, backend))
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    print(f"ssm: {mixer} uses the {backend} backend" + (f" ({why})" if why else ""), flush=True)


@torch.compiler.assume_constant_result
def _use_kernels(mixer: str, device_type: str) -> bool:
    """Whether `mixer` runs on the kernels for `device_type` tensors (per the backend choice).

    A compile-time constant for torch.compile (evaluated once while tracing, its print included), so
    choose the backend before compiling; benchmark.py resets dynamo between backends.
    """
    backend = get_backend()
    if backend == "torch":
        _announce(mixer, "torch", "requested")
        return False
    why = _unavailable_reason(mixer, device_type)
    if why is None:
        _announce(mixer, "mamba_ssm")
        return True
    if backend == "mamba_ssm":
        raise BackendUnavailableError(_unavailable_message({mixer: why}))
    _announce(mixer, "torch", why)
    return False


def kernels_for(mixer: str, tensor: torch.Tensor) -> Optional[_Kernels]:
    """The kernels to use for `mixer` on `tensor`, or None for the torch path (per the backend choice)."""
    return _kernels() if _use_kernels(mixer, tensor.device.type) else None


def available_backends() -> dict:
    """{backend: None if usable else why}; the per-mixer keys tell a partial mamba_ssm install apart.

    "mamba_ssm" is None only when both mixers have kernels and CUDA is present; "mamba_ssm:Mamba2" and
    "mamba_ssm:Mamba1" give each mixer's status (a Triton-only install serves Mamba2 but not Mamba1,
    which then falls back to torch under "auto"). Imports the kernels (cached) to find out.
    """
    per_mixer = {m: _unavailable_reason(m, None) for m in ("Mamba2", "Mamba1")}
    result = {"torch": None}
    result["mamba_ssm"] = _unavailable_message(per_mixer) if any(per_mixer.values()) else None
    result.update({f"mamba_ssm:{m}": why for m, why in per_mixer.items()})
    return result


def versions() -> dict:
    """Installed versions of the kernel packages (None where absent), read without importing them."""
    found = {}
    for package in ("mamba_ssm", "causal_conv1d"):
        try:
            found[package] = importlib.metadata.version(package.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def report():
    """Print which backends are usable here and, for each missing piece, why (`python -m advarm`)."""
    print(f"SSM backend requested: {get_backend()} (set_backend() / env SSM_BACKEND; one of {', '.join(BACKENDS)})")
    print(f"CUDA available: {torch.cuda.is_available()}; installed: "
          + ", ".join(f"{name} {version or 'no'}" for name, version in versions().items()))
    for name, reason in available_backends().items():
        print(f"  {name:16s} {'usable' if reason is None else 'unavailable: ' + reason}")
    pieces = _kernels()
    for piece, fn in (("mamba_split_conv1d_scan_combined (Mamba2 fused)", pieces.split_conv1d_scan),
                      ("mamba_chunk_scan_combined (Mamba2 Triton SSD)", pieces.chunk_scan),
                      ("selective_scan_fn (Mamba1 CUDA)", pieces.selective_scan),
                      ("causal_conv1d_fn", pieces.causal_conv1d)):
        print(f"  {piece:50s} {'imported' if fn is not None else 'missing'}")
    for piece, why in pieces.problems.items():
        print(f"  why {piece}: {why}")
