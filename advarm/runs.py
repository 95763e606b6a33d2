"""One output folder, one run: what the three training scripts do so that kills, resumes and mistakes lose
nothing.

* `run_folder(args)`: a lock file in `--output_dir` (host and pid of the holder) stops a second run on the
  same folder; a lock left by a killed run is taken over. A fresh run (no `--resume`) refuses a folder that
  holds another run's checkpoints or log unless `--overwrite` moves them aside. Temp files of saves that
  were killed mid-write are removed, and `--resume auto` is resolved (checkpoint.resolve_resume).
* `check_resumed_flags`: flags that differ from the checkpoint's `args` are applied and named in one line;
  model flags that cannot apply stop the run.
* `save_training_state`: the official checkpoint entries plus where the sampler stands (`sampler`) and every
  rank's random state (`rng`: torch CPU/CUDA, numpy, python, in weights-only-loadable form), written
  atomically and never from non-finite weights. `restore_rng` and `resume_point` continue from them.
* `trim_log`: log.txt rows of epochs a resume trains again are dropped, so each epoch has one row.
"""
import argparse
import datetime
import json
import os
import random
import socket
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from advarm import checkpoint, loggers

try:
    import fcntl
except ImportError:  # Windows: no POSIX record locks, so runs there are not locked
    fcntl = None

LOCK_NAME = "run.lock"
LOG_NAME = "log.txt"
RUN_FILES = ("checkpoint*.pth", "best_checkpoint.pth", LOG_NAME, "curves.png")
# Flags that change how a run is launched or logged, never what it computes (`start_epoch` is always the
# checkpoint's, as officially, and is stored as the resumed value).
PLUMBING_FLAGS = {
    "resume", "start_epoch", "output_dir", "log_dir", "data_path", "device", "num_workers", "pin_mem", "eval",
    "overwrite", "check_images", "log_every", "ssm_backend", "compile", "if_wandb", "wandb_resume", "wandb_project",
    "wandb_entity", "wandb_name", "mlflow", "mlflow_resume", "log_best_checkpoint", "tensorboard", "distributed",
    "world_size", "rank", "gpu", "local_rank", "dist_url", "dist_backend", "dist_on_itp",
    # run_with_submitit.py's launcher flags
    "script", "ngpus", "nodes", "timeout", "job_dir", "partition", "use_volta32", "comment", "cluster", "mem_gb",
    "cpus_per_task", "account", "qos", "constraint", "exclude",
}
# Flags that decide the model's tensors: a resume cannot apply a change (the weights would not fit).
MODEL_FLAGS = ("model", "input_size", "model_kwargs", "nb_classes")
# Flags whose new value a resume cannot honour, and why.
KEPT_FLAGS = {"seed": "the random streams continue the checkpoint's",
              "finetune": "the weights come from the checkpoint"}


def add_run_flags(parser):
    """The run-safety flags every training script has (additions to the official flags)."""
    parser.add_argument("--overwrite", action="store_true",
                        help="start a fresh run in an --output_dir that holds another run; its checkpoints and "
                             "log.txt move to <output_dir>/replaced-<time>/ first")
    parser.add_argument("--skip-nonfinite", dest="skip_nonfinite", default=0, type=int, metavar="N",
                        help="skip up to N steps whose loss is NaN/inf (counted in log.txt) instead of stopping "
                             "at the first")
    parser.add_argument("--check-images", dest="check_images", action="store_true",
                        help="decode every image file once at start-up and report the unreadable ones before "
                             "training (follows --bad-images)")
    parser.add_argument("--save-every-iters", dest="save_every_iters", default=0, type=int, metavar="N",
                        help="also save the rolling checkpoint every N iterations inside an epoch, so a killed "
                             "job loses at most N iterations (0: only at epoch ends)")
    return parser


# ---------------------------------------------------------------------------------------------------
# the run folder


def _rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _agree(problem):
    """Rank 0's verdict on every rank, so all of them stop together instead of hanging in a collective."""
    if not (dist.is_available() and dist.is_initialized()):
        return problem
    message = [problem]
    dist.broadcast_object_list(message, src=0)
    return message[0]


class RunLock:
    """An exclusive POSIX record lock on `<folder>/run.lock`, which names its holder (host, pid, start).

    The kernel drops the lock when its process dies, even by SIGKILL, so a lock file whose lock nobody holds
    is a killed run's and is taken over. POSIX locks belong to the process: DataLoader workers forked from
    it do not keep a dead run's folder locked, and NFS (v4, or v3 with lockd) shares them across hosts. The
    price: closing any descriptor of the file drops the lock, so the holder never opens it otherwise.
    """

    def __init__(self, folder):
        self.path = Path(folder) / LOCK_NAME
        self.fd = None

    def acquire(self):
        if fcntl is None:
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 4096).decode(errors="replace").strip() or "holder unknown"
                os.close(fd)
                raise SystemExit(f"error: --output_dir {self.path.parent} is in use by another run ({holder}); "
                                 f"wait for it to end or pick another --output_dir") from None
            try:  # the holder may have deleted the file between our open and lock: lock the current one
                same_file = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:
                break
            os.close(fd)
        previous = os.read(fd, 4096).decode(errors="replace").strip()
        if previous:
            print(f"note: {self.path} was left by a run that no longer runs ({previous}); taking it over")
        holder = f"host {socket.gethostname()}, pid {os.getpid()}, since {datetime.datetime.now():%Y-%m-%d %H:%M:%S}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self):
        """Delete the file while still holding the lock, so the next run finds a clean folder."""
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None


def _previous_run(folder):
    return sorted({p for pattern in RUN_FILES for p in folder.glob(pattern)
                   if p.is_file() and (p.name != LOG_NAME or p.stat().st_size > 0)})


def _claim_folder(args, folder):
    """Lock the folder, clear dead saves' temp files and refuse (or, with --overwrite, move) another run."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = RunLock(folder).acquire()
    try:
        stale = checkpoint.remove_stale_temp_files(folder)
        if stale:
            print(f"note: removed {len(stale)} temp file(s) of saves interrupted by a kill: "
                  f"{', '.join(p.name for p in stale)}")
        previous = _previous_run(folder)
        if previous and not args.resume:
            if not getattr(args, "overwrite", False):
                raise SystemExit(
                    f"error: --output_dir {folder} already holds a run ({', '.join(p.name for p in previous[:4])}"
                    f"{', ...' if len(previous) > 4 else ''}); continue it with --resume auto, start over with "
                    f"--overwrite (its files move to a replaced-<time>/ subfolder), or pick another --output_dir")
            aside = folder / f"replaced-{datetime.datetime.now():%Y%m%d-%H%M%S}"
            aside.mkdir()
            for path in previous:
                path.rename(aside / path.name)
            print(f"--overwrite: moved the previous run's {len(previous)} file(s) to {aside}")
    except BaseException:
        lock.release()
        raise
    return lock


@contextmanager
def run_folder(args):
    """Hold `--output_dir` for this run (rank 0 locks it) and resolve `--resume auto`; releases on exit.

    Evaluation (`args.eval`) writes no checkpoints, so it neither locks nor minds an existing run (main.py's
    evaluation log line goes to log.txt, whose folder the logger creates).
    """
    folder = Path(args.output_dir) if args.output_dir else None
    if args.resume == "auto" and folder is None:
        raise SystemExit("error: --resume auto looks for checkpoints in --output_dir; set --output_dir")
    if getattr(args, "overwrite", False) and args.resume:
        raise SystemExit("error: --overwrite starts the run over and --resume continues it; pass only one")
    lock, problem = None, None
    if folder is not None and _rank() == 0 and not getattr(args, "eval", False):
        try:
            lock = _claim_folder(args, folder)
        except OSError as err:  # a path through a regular file, a read-only or full disk
            problem = f"error: --output_dir {folder} cannot be used ({err.strerror or err})"
        except SystemExit as err:
            problem = str(err.code)
    problem = _agree(problem)
    if problem:
        if lock is not None:
            lock.release()
        raise SystemExit(problem if _rank() == 0 else 1)
    try:
        args.resume = checkpoint.resolve_resume(args.resume, args.output_dir)
        yield lock
    finally:
        if lock is not None:
            lock.release()


def trim_log(output_dir, start_epoch):
    """Keep only log.txt rows of epochs before `start_epoch` (and rows without an epoch, e.g. evaluations).

    A run writes an epoch's row before the checkpoint that marks the epoch done, so a kill between the two
    leaves a row for an epoch the resume trains again (and a kill mid-write leaves a partial line).
    """
    path = Path(output_dir) / LOG_NAME if output_dir else None
    if _rank() != 0 or path is None or not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict) or not isinstance(row.get("epoch"), int) or row["epoch"] < start_epoch:
            kept.append(line)
    text = "".join(line + "\n" for line in kept)
    if text != path.read_text():
        tmp = path.with_name(f".{LOG_NAME}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------
# resuming


def check_resumed_flags(args, ckpt, source):
    """Compare this run's flags with the checkpoint's `args`; returns {flag: (old, new)} of those that differ.

    Model flags that differ stop the run (the weights would not fit); the others are applied (optimiser
    hyper-parameters too, see load_optimizer_state) or, for KEPT_FLAGS, kept from the checkpoint. Either
    way the differences are printed in one line.
    """
    stored = ckpt.get("args")
    if not isinstance(stored, argparse.Namespace):
        return {}
    old, new = vars(stored), vars(args)
    changed = {k: (old[k], new[k]) for k in sorted(old.keys() & new.keys())
               if k not in PLUMBING_FLAGS and old[k] != new[k]}
    model = [k for k in MODEL_FLAGS if k in changed]
    if model:
        raise checkpoint.CheckpointError(
            f"{source} is a run of another model ({_listing(changed, model)}); resume with its model flags, or "
            f"start a new run from its weights with --finetune")
    applied = [k for k in changed if k not in KEPT_FLAGS]
    kept = [f"{_listing(changed, [k])} (kept: {KEPT_FLAGS[k]})" for k in changed if k in KEPT_FLAGS]
    if changed:
        parts = ([f"{_listing(changed, applied)} (the new values apply)"] if applied else []) + kept
        print(f"note: resuming {source} with flags that differ from its run: {'; '.join(parts)}")
    return changed


def _listing(changed, keys):
    return ", ".join(f"{k} {changed[k][0]!r} -> {changed[k][1]!r}" for k in keys)


def load_optimizer_state(optimizer, state, source):
    """Restore the optimiser's state (moments, steps) but keep this run's hyper-parameters (lr, betas, ...).

    `optimizer.load_state_dict` would bring back the checkpoint's values and silently ignore a changed
    `--lr` or `--weight_decay`; unchanged flags give the same values, so nothing else differs.
    """
    keys = set(optimizer.defaults) | {"initial_lr", "lr_scale"}
    fresh = [{k: v for k, v in group.items() if k in keys} for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError) as err:
        raise checkpoint.CheckpointError(f"{source}: cannot restore the optimizer ({err}); resume with the flags "
                                         "of the original run (--opt, --layer_decay, --weight_decay groups)") from None
    for group, hyper in zip(optimizer.param_groups, fresh):
        group.update(hyper)


def restore_training(args, ckpt, optimizer, loss_scaler, official_file):
    """The ARM scripts' official `load_model` after the weights: optimiser, start epoch, loss scaler, and
    the trackers' run ids. An official file storing a negative epoch (`official_file`, e.g. the rolling
    checkpoint--1.pth) cannot say where it stands: the run continues at --start_epoch, as officially."""
    load_optimizer_state(optimizer, ckpt["optimizer"], args.resume)
    if "sampler" in ckpt or ckpt["epoch"] >= 0:
        args.start_epoch = checkpoint.resume_point(ckpt)[0]
    else:
        print(f"note: {args.resume} stores epoch {ckpt['epoch']} ({official_file}), "
              f"continuing at --start_epoch {args.start_epoch}")
    if "scaler" in ckpt:
        loss_scaler.load_state_dict(ckpt["scaler"])
    loggers.continue_runs(args, ckpt)
    print("With optim & sched!")


def already_finished(start_epoch, epochs, source):
    """True (after one line saying so) when the checkpoint has trained every epoch this run asks for."""
    if start_epoch < epochs:
        return False
    print(f"{source}: the run has already trained its {epochs} epochs; nothing to do (pass a larger --epochs "
          f"to train on)")
    return True


# ---------------------------------------------------------------------------------------------------
# random state and saving


def rng_state():
    """This process's random generators as tensors and numbers (what weights-only loading accepts)."""
    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    python, numpy = state["python"], state["numpy"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def restore_rng(ckpt):
    """Continue this rank's random streams from the checkpoint (call just before the training loop)."""
    states = ckpt.get("rng")
    if not isinstance(states, list) or not states:
        return False
    world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if len(states) != world_size:
        print(f"note: the checkpoint holds the random state of {len(states)} processes, this run has {world_size}; "
              f"the random streams start afresh")
        return False
    set_rng_state(states[_rank()])
    return True


def _non_finite(models):
    for label, model in models.items():
        for name, value in (model.named_parameters() if model is not None else ()):
            if not torch.isfinite(value).all():
                return f"{label}.{name}"
    return None


def save_training_state(path, state, next_epoch, position=0, models=None):
    """Save `state` (the official entries) with the sampler position and every rank's random state.

    next_epoch / position: the epoch training continues with and the samples of it already trained (per
    rank). Call it on every rank (the random states are gathered); rank 0 writes. When a parameter of
    `models` ({label: module}, e.g. the model and its EMA) is no longer finite, nothing is written over the
    last good file: the run stops instead (buffers such as attention masks may hold -inf on purpose).
    """
    states = [rng_state()]
    if dist.is_available() and dist.is_initialized():
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, rng_state())
    bad = _non_finite(models or {})
    if bad:
        raise checkpoint.CheckpointError(
            f"{path} not saved: the weights are no longer finite ({bad}) at epoch {next_epoch}, sample {position}; "
            f"the file keeps the last good weights. Lower --lr or set a gradient clip, then --resume auto")
    return checkpoint.save_checkpoint({**state, "sampler": {"epoch": next_epoch, "position": position},
                                       "rng": states}, path)
