"""Checkpoint I/O and adaptation shared by the three training scripts.

Loading never unpickles arbitrary objects unless the caller says the file is trusted: official training
checkpoints only need `argparse.Namespace` (their `args`) and path objects beyond plain tensors and
containers. Saving is atomic, so a job killed mid-write (Slurm preemption) never leaves a truncated
`checkpoint.pth` behind for `--resume auto` to trip over.
"""
import argparse
import math
import os
import pathlib
import re
import tempfile
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from timm.layers import resample_abs_pos_embed

# The only non-tensor classes official (and our) checkpoints pickle: `args`, and paths inside it
# (the official Slurm launcher stores output_dir as a Path).
SAFE_GLOBALS = [argparse.Namespace, pathlib.PosixPath, pathlib.WindowsPath,
                pathlib.PurePosixPath, pathlib.PureWindowsPath]

STATE_DICT_KEYS = ("model", "state_dict", "model_ema", "state_dict_ema", "module")
STRIPPED_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
CLS_POSITIONS = ("last", "first", "middle", "none")
MAX_LISTED = 10


class CheckpointError(ValueError):
    """A checkpoint file or state dict cannot be used; the message names the file and the problem."""


def load_checkpoint_file(path, map_location="cpu", trusted=False):
    """Load a `.pth/.pt/.bin` (torch) or `.safetensors` file into a dict.

    `trusted=True` allows full unpickling for files from a source you trust (it can run code).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (an interrupted save?)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(path, device=str(map_location))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    if trusted:
        warnings.warn(f"{path}: loading with full unpickling (trusted=True); only do this for files you trust")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            checkpoint = torch.load(path, map_location=map_location, weights_only=not trusted)
    except Exception as err:  # parsing arbitrary bytes: the unpickler raises all sorts of errors
        text = str(err)
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if refused:
            raise CheckpointError(f"{path}: safe loading refuses {refused.group(1)}; if you trust the file's "
                                  f"source, load it with trusted=True (full unpickling can run code)") from None
        unpickler = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        detail = f"{type(err).__name__}: " + (unpickler.group(1).strip() if unpickler else text.split(". ")[0].strip())
        if "zip archive" in detail or "central directory" in detail or isinstance(err, EOFError):
            problem = "truncated or corrupt file"
        else:
            problem = "not a torch checkpoint, or corrupt"
        raise CheckpointError(f"{path}: {problem} ({detail})") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(checkpoint).__name__}")
    return checkpoint


def load_checkpoint_container(path):
    """A checkpoint dict from a local file or an https URL, with safe (weights-only) unpickling."""
    if str(path).startswith("https"):
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.hub.load_state_dict_from_url(path, map_location="cpu", check_hash=True, weights_only=True)
    return load_checkpoint_file(path)


def _is_state_dict(obj):
    return isinstance(obj, dict) and len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


def extract_state_dict(checkpoint, key=None):
    """Return the tensor dict inside a bare state dict or a training container, without wrapper prefixes.

    Without `key` the first of `model`, `state_dict`, `model_ema`, `state_dict_ema`, `module` wins, which
    is what official evaluation reads (`model`).
    """
    if key is not None:
        if key not in checkpoint or checkpoint[key] is None:
            present = ", ".join(k for k in checkpoint if checkpoint[k] is not None)
            raise CheckpointError(f"checkpoint has no '{key}' entry (entries: {present})")
        state_dict = checkpoint[key]
    elif _is_state_dict(checkpoint):
        state_dict = checkpoint
    else:
        found = [k for k in STATE_DICT_KEYS if _is_state_dict(checkpoint.get(k))]
        if not found:
            raise CheckpointError(
                f"checkpoint holds no state dict (looked for a bare tensor dict or one of "
                f"{', '.join(STATE_DICT_KEYS)}; entries: {', '.join(map(str, checkpoint))})")
        state_dict = checkpoint[found[0]]
    if not _is_state_dict(state_dict):
        raise CheckpointError(f"checkpoint entry '{key}' is not a dict of tensors")
    return {_strip_prefixes(k): v for k, v in state_dict.items()}


def _strip_prefixes(key):
    for prefix in STRIPPED_PREFIXES:
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def _listing(what, items):
    shown = ", ".join(items[:MAX_LISTED])
    more = f", ... (+{len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
    return f"{len(items)} {what}: {shown}{more}"


def load_state_dict_strict(model, state_dict, strict=True, source=None):
    """`model.load_state_dict` with one readable error listing every mismatch.

    Wrong shapes always raise (even with strict=False); missing/unexpected keys raise only when strict.
    Returns torch's (missing_keys, unexpected_keys) result.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [f"{k} (checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)})"
                   for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape]
    problems = []
    if strict and missing:
        problems.append(_listing("missing keys", missing))
    if strict and unexpected:
        problems.append(_listing("unexpected keys", unexpected))
    if wrong_shape:
        problems.append(_listing("wrong-shape keys", wrong_shape))
    if problems:
        origin = f" from {source}" if source else ""
        raise CheckpointError(f"cannot load weights{origin} into {type(model).__name__}: " + "; ".join(problems))
    return model.load_state_dict(state_dict, strict=strict)


def load_weights(model, path, key=None, strict=True, filter_fn=None, trusted=False):
    """Load `path` into `model`; `filter_fn(state_dict, model) -> state_dict` adapts foreign layouts first."""
    state_dict = extract_state_dict(load_checkpoint_file(path, trusted=trusted), key=key)
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, model)
    return load_state_dict_strict(model, state_dict, strict=strict, source=path)


def save_checkpoint(obj, path):
    """Write atomically (temp file in the same folder, fsync, rename); only rank 0 writes.

    A `.safetensors` path stores a bare state dict of tensors. Returns the path written, None on other ranks.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        if not _is_state_dict(obj):
            raise CheckpointError(f"{path}: .safetensors holds a bare state dict of tensors only")
        from safetensors.torch import save
        payload = save({k: v.detach().cpu().contiguous().clone() for k, v in obj.items()}, metadata={"format": "pt"})
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file 0600; give it the permissions a plain open() would (shared run folders).
        os.chmod(tmp_name, 0o666 & ~_current_umask())
        with os.fdopen(fd, "wb") as f:
            if path.suffix == ".safetensors":
                f.write(payload)
            else:
                torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # the rename itself survives a power loss only once the folder is synced
    return path


def _fsync_dir(folder):
    if os.name != "posix":  # folders cannot be opened for fsync on Windows
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _current_umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _stored_epoch(path):
    """The checkpoint's `epoch` (-inf without one), or None when the file is incomplete or unreadable."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    epoch = checkpoint.get("epoch") if isinstance(checkpoint, dict) else None
    return float(epoch) if isinstance(epoch, (int, float)) else -math.inf


def latest_checkpoint(output_dir, patterns=("checkpoint.pth", "checkpoint-*.pth")):
    """The complete checkpoint in `output_dir` that resumes furthest (stored epoch, then mtime), or None.

    `checkpoint-*.pth` also matches ARM's `checkpoint--1.pth` (every-epoch, epoch -1) and finetune bests
    (`--10`, `--20`); their negative epochs rank them below real epoch checkpoints. Temp files of an
    interrupted save and truncated files are skipped. Tensor data is memory-mapped, not read.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    candidates = {p for pattern in patterns for p in output_dir.glob(pattern)
                  if p.is_file() and not p.name.startswith(".") and not p.name.endswith(".tmp")}
    ranked = []
    for path in candidates:
        epoch = _stored_epoch(path)
        if epoch is not None:
            ranked.append((epoch, path.stat().st_mtime, path))
    return max(ranked)[2] if ranked else None


def resolve_resume(resume, output_dir):
    """`--resume auto` -> the newest complete checkpoint in `output_dir` ('' when there is none yet)."""
    if resume != "auto":
        return resume
    found = latest_checkpoint(output_dir) if output_dir else None
    print(f"--resume auto: {'resuming from ' + str(found) if found else f'no checkpoint in {output_dir!r}, starting fresh'}")
    return str(found) if found else ""


def resize_pos_embed(pos_embed, new_grid, old_grid=None, cls_position="last"):
    """Bicubically resample a (1, T, C) position table to `new_grid`, keeping the cls slot's vector.

    cls_position: "last" (Adventurer layout), "first" (what Adventurer's `--finetune` does to its
    cls-last table: the one-token raster shift of SPEC 6.4), "middle" (ARM: cls at index N//2 of the
    N grid tokens, re-inserted at the new N//2), "none" (no cls slot, e.g. ARM pretraining tables).
    antialias=False keeps the official F.interpolate numbers.
    """
    if cls_position not in CLS_POSITIONS:
        raise ValueError(f"cls_position must be one of {CLS_POSITIONS}, got {cls_position!r}")
    new_grid = (new_grid, new_grid) if isinstance(new_grid, int) else tuple(new_grid)
    num_cls = 0 if cls_position == "none" else 1
    num_grid = pos_embed.shape[1] - num_cls
    if old_grid is None:
        side = math.isqrt(num_grid)
        if side * side != num_grid:
            raise CheckpointError(f"position table of {pos_embed.shape[1]} tokens with cls_position="
                                  f"'{cls_position}' has {num_grid} grid tokens, not a square; pass old_grid")
        old_grid = (side, side)
    old_grid = (old_grid, old_grid) if isinstance(old_grid, int) else tuple(old_grid)
    if old_grid[0] * old_grid[1] != num_grid:
        raise CheckpointError(f"old_grid {old_grid} does not match {num_grid} grid tokens")
    if old_grid == new_grid:
        return pos_embed

    def resample(table, prefix):
        return resample_abs_pos_embed(table, list(new_grid), list(old_grid), num_prefix_tokens=prefix,
                                      interpolation="bicubic", antialias=False)

    if cls_position in ("first", "none"):
        return resample(pos_embed, num_cls)
    if cls_position == "last":
        moved = torch.cat([pos_embed[:, -1:], pos_embed[:, :-1]], dim=1)
        resized = resample(moved, 1)
        return torch.cat([resized[:, 1:], resized[:, :1]], dim=1)
    middle = num_grid // 2
    grid = torch.cat([pos_embed[:, :middle], pos_embed[:, middle + 1:]], dim=1)
    return insert_token(resample(grid, 0), (new_grid[0] * new_grid[1]) // 2, pos_embed[:, middle])


def insert_token(pos_embed, index, value=None):
    """Insert one (C,) vector (zeros by default) at token `index` of a (1, T, C) table.

    ARM finetuning from a cls-free pretraining table: insert_token(resized, N // 2).
    """
    if value is None:
        value = pos_embed.new_zeros(pos_embed.shape[-1])
    value = value.reshape(1, 1, -1).to(pos_embed)
    return torch.cat([pos_embed[:, :index], value, pos_embed[:, index:]], dim=1)


class SavingEvery:
    """Yields the loader's batches and calls `save(done)` each time `every` more iterations have finished.

    The engine asks for batch k+1 only after batch k's optimiser step and EMA update, so a save issued
    then holds exactly k trained iterations.
    """

    def __init__(self, loader, every, save, already_done=0):
        self.loader, self.every, self.save, self.already_done = loader, every, save, already_done

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for position, batch in enumerate(self.loader):
            done = self.already_done + position
            if position and done % self.every == 0:
                self.save(done)
            yield batch
