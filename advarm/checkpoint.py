"""Checkpoint I/O and adaptation shared by the three training scripts.

Loading never unpickles arbitrary objects unless the caller says the file is trusted: official training
checkpoints only need `argparse.Namespace` (their `args`) and path objects beyond plain tensors and
containers. Saving is atomic, so a job killed mid-write (Slurm preemption) never leaves a truncated
`checkpoint.pth` behind for `--resume auto` to trip over; the temp file it leaves is never picked up and is
removed by the next run's start-up. `--resume auto` stops, naming the file, when the newest checkpoint
cannot be read, instead of silently resuming older work or starting over.
"""
import argparse
import math
import os
import pathlib
import re
import tempfile
import warnings
import zipfile
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
RESUME_PATTERNS = ("checkpoint.pth", "checkpoint-*.pth")
# Best-so-far copies (ARM finetuning) are written before an epoch's rolling checkpoint: resuming from one
# after a kill between the two would leave that epoch's other files unwritten, so they are not resume points.
BEST_COPIES = ("checkpoint--10.pth", "checkpoint--20.pth")
TEMP_PATTERNS = (".*.pth.*.tmp", ".*.safetensors.*.tmp")  # save_checkpoint's temp files
TRUSTED_HINT = ("if you trust the file's source, load it in Python with advarm.checkpoint.load_checkpoint_file("
                "path, trusted=True) and save the tensors you need, e.g. torch.save({'model': ckpt['model']}, PATH)")


class CheckpointError(ValueError):
    """A checkpoint file or state dict cannot be used; the message names the file and the problem."""


def load_checkpoint_file(path, map_location="cpu", trusted=False, mmap=False):
    """Load a `.pth/.pt/.bin` (torch) or `.safetensors` file into a dict.

    `trusted=True` allows full unpickling for files from a source you trust (it can run code). `mmap=True`
    maps tensor data instead of reading it (zip-format torch files), for looking at a file's entries.
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
    mmap = mmap and zipfile.is_zipfile(path)  # torch's pre-1.6 (non-zip) format cannot be memory-mapped
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            checkpoint = torch.load(path, map_location=map_location, weights_only=not trusted, mmap=mmap)
    except Exception as err:  # parsing arbitrary bytes: the unpickler raises all sorts of errors
        text = str(err)
        # torch words it "Unsupported global: GLOBAL x.y" or "Trying to load unsupported GLOBAL x.y whose ..."
        refused = re.search(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)", text)
        if refused:
            raise CheckpointError(f"{path}: safe loading refuses {refused.group(1)} (unpickling it could run "
                                  f"code); {TRUSTED_HINT}") from None
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
    try:
        return _save_atomically(obj, path)
    except OSError as err:  # disk full, folder removed or read-only: one line naming the file
        raise CheckpointError(f"cannot write {path}: {err.strerror or err}") from None


def _save_atomically(obj, path):
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


def resume_point(ckpt):
    """(epoch to continue with, samples of it already trained) of a training checkpoint.

    Ours store it in `sampler` (mid-epoch saves too); official ones only have `epoch` (the last finished
    one). Files without an epoch rank below everything else.
    """
    sampler = ckpt.get("sampler")
    if isinstance(sampler, dict) and "epoch" in sampler:
        return int(sampler["epoch"]), int(sampler.get("position", 0))
    epoch = ckpt.get("epoch")
    return (int(epoch) + 1, 0) if isinstance(epoch, (int, float)) else (-math.inf, 0)


def scan_checkpoints(output_dir, patterns=RESUME_PATTERNS):
    """([(resume point, mtime, path)] of the complete checkpoints, [(mtime, path, reason)] of unreadable ones).

    `checkpoint-*.pth` also matches ARM's rolling `checkpoint--1.pth`; the best copies (BEST_COPIES) and
    temp files of interrupted saves are not candidates. Tensor data is memory-mapped, not read.
    """
    output_dir = Path(output_dir)
    found = {p for pattern in patterns for p in output_dir.glob(pattern)} if output_dir.is_dir() else set()
    paths = {p for p in found if p.is_file() and not p.name.startswith(".") and p.name not in BEST_COPIES}
    readable, unreadable = [], []
    for path in sorted(paths):
        mtime = path.stat().st_mtime
        try:
            readable.append((resume_point(load_checkpoint_file(path, mmap=True)), mtime, path))
        except CheckpointError as err:
            unreadable.append((mtime, path, str(err)))
    return readable, unreadable


def latest_checkpoint(output_dir, patterns=RESUME_PATTERNS):
    """The complete checkpoint in `output_dir` that resumes furthest (resume point, then mtime), or None."""
    readable, _ = scan_checkpoints(output_dir, patterns)
    return max(readable)[2] if readable else None


def resolve_resume(resume, output_dir):
    """`--resume auto` -> the checkpoint in `output_dir` that resumes furthest ('' when there is none yet).

    When the newest file cannot be read (a crafted, truncated or foreign file) this stops, naming it:
    resuming anything else or starting over would silently lose or overwrite work. Unreadable files older
    than the one chosen are named in a note.
    """
    if resume != "auto":
        return resume
    readable, unreadable = scan_checkpoints(output_dir)
    found = max(readable) if readable else None
    newest_bad = max(unreadable) if unreadable else None
    if newest_bad and (found is None or newest_bad[0] >= found[1]):
        fallback = f"resume from {found[2].name}" if found else "start over"
        raise CheckpointError(f"--resume auto: {newest_bad[2]}; it is the newest checkpoint in {output_dir}, so "
                              f"nothing else is used in its place: move it away to {fallback}, or pass --resume PATH")
    for _, path, reason in unreadable:
        print(f"note: --resume auto skips an older unreadable file: {reason}")
    if found is None:
        print(f"--resume auto: no checkpoint in {output_dir!r}, starting fresh")
        return ""
    print(f"--resume auto: resuming from {found[2]}")
    return str(found[2])


def remove_stale_temp_files(folder):
    """Delete temp files that saves killed mid-write left in `folder`; returns their paths.

    Only call this while holding the folder's run lock: another run's save in progress looks the same.
    """
    stale = [p for pattern in TEMP_PATTERNS for p in Path(folder).glob(pattern) if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


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
    """Yields the loader's batches and calls `save(position)` each time `every` more iterations have finished.

    position: samples of the epoch trained so far (per process), counting the `start` samples a mid-epoch
    resume skipped. Iterations are counted from the epoch's start, so saves land on multiples of `every`
    whether or not the epoch was resumed. The engine asks for batch k+1 only after batch k's optimiser step
    and EMA update, so a save issued then holds exactly the trained iterations.
    """

    def __init__(self, loader, every, save, start=0, batch_size=1):
        self.loader, self.every, self.save = loader, every, save
        self.start, self.batch_size = start, batch_size

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        first_step = self.start // self.batch_size
        for i, batch in enumerate(self.loader):
            if i and (first_step + i) % self.every == 0:
                self.save(self.start + i * self.batch_size)
            yield batch
