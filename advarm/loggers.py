"""Experiment logging: per-epoch JSON lines in log.txt, curves.png, and the optional trackers (wandb,
mlflow, TensorBoard), each imported only when its flag asks for it.

One step axis for every tracker: `step` = training iterations (batches per process) completed since the
start of training, i.e. `epoch * iterations_per_epoch + iterations done in the epoch`. Per-iteration
points (`train/loss_step`, `train/lr`) sit at the step reached after their optimiser update; per-epoch
points keep their log.txt names (`train_loss`, `test_acc1`, ..., `epoch`; the official mlflow metrics) and
sit at the step reached at the end of the epoch (wandb also plots them against `epoch`). A resumed run
computes the same steps, so its axes continue instead of restarting at 0.

One run per training: the run ids live in `args` (`wandb_resume`, `mlflow_resume`), which every checkpoint
stores; `continue_runs` copies them back when a checkpoint is resumed (`--resume PATH|auto`, a Slurm
requeue), so wandb and mlflow continue the same run and TensorBoard appends to the same folder.
"""
import importlib
import json
import os
import re
import shutil
from pathlib import Path
from urllib.parse import urlparse

from advarm import utils

RUN_ID_FLAGS = ("wandb_resume", "mlflow_resume")


def add_logger_args(parser, log_dir_default=None):
    """The tracker flags, the same in all three scripts; only `--log_dir`'s default differs (official:
    Adventurer has none, ARM writes TensorBoard to ./output_dir)."""
    group = parser.add_argument_group("experiment tracking")
    group.add_argument("--if_wandb", action="store_true", help="log to wandb (WANDB_MODE=offline: no account)")
    group.add_argument("--disable_wandb", action="store_false", dest="if_wandb")
    parser.set_defaults(if_wandb=False)
    group.add_argument("--wandb_resume", default=None, metavar="RUN_ID",
                       help="wandb run id to continue (a resumed checkpoint supplies its own)")
    group.add_argument("--wandb_project", default=None, help="wandb project (default: $WANDB_PROJECT)")
    group.add_argument("--wandb_entity", default=None, help="wandb team or user (default: $WANDB_ENTITY)")
    group.add_argument("--wandb_name", default=None, help="wandb run name (default: exp_<model>)")
    group.add_argument("--mlflow", action="store_true",
                       help="log to mlflow: $MLFLOW_TRACKING_URI, else a file store in ./mlruns")
    group.add_argument("--mlflow_resume", default=None, metavar="RUN_ID",
                       help="mlflow run id to continue (a resumed checkpoint supplies its own)")
    group.add_argument("--tensorboard", action="store_true", help="TensorBoard events in --log_dir or --output_dir")
    group.add_argument("--log_dir", default=log_dir_default, help="TensorBoard directory, empty for none")
    group.add_argument("--log-best-checkpoint", dest="log_best_checkpoint", action="store_true",
                       help="upload the best checkpoint (pretraining: the last) to wandb/mlflow at the end")


def continue_runs(args, checkpoint):
    """On resume: reuse the tracker run ids stored in the checkpoint's `args` (ids given as flags win)."""
    stored = checkpoint.get("args")
    for name in RUN_ID_FLAGS:
        if not getattr(args, name, None) and getattr(stored, name, None):
            setattr(args, name, getattr(stored, name))


def _import_optional(module, package, flag):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SystemExit(f"{flag} needs the optional package '{package}': pip install {package}") from None


def _plain_config(args):
    """args as JSON-friendly values for the trackers' config/params."""
    return {k: v if isinstance(v, (bool, int, float, str, type(None))) else str(v) for k, v in vars(args).items()}


def _one_line(err):
    return re.sub(r"\s+", " ", str(err)).strip() or type(err).__name__


def _is_file_uri(uri):
    """A local file store: `file:` URIs and plain paths (a one-letter scheme is a Windows drive)."""
    return len(urlparse(uri).scheme) <= 1 or urlparse(uri).scheme == "file"


def plot_curves(log_path, out_path):
    """Loss and accuracy vs epoch from a log.txt (last line per epoch wins after a resume).

    Returns out_path, or None without plottable keys or without matplotlib.
    """
    rows = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    rows = sorted({row["epoch"]: row for row in rows if "epoch" in row}.values(), key=lambda row: row["epoch"])
    panels = [(title, [k for k in keys if any(k in row for row in rows)])
              for title, keys in (("loss", ("train_loss", "test_loss")),
                                  ("top-1 accuracy (%)", ("test_acc1", "ema_test_acc1")))]
    panels = [(title, keys) for title, keys in panels if keys]
    if not panels:
        return None
    try:
        from matplotlib.figure import Figure  # object API: no pyplot, no global backend switch
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        print(f"note: matplotlib is not installed, {out_path} not written (pip install matplotlib)")
        return None
    fig = Figure(figsize=(5 * len(panels), 4))
    for ax, (title, keys) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for key in keys:
            points = [(row["epoch"], row[key]) for row in rows if key in row]
            ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, label=key)
        ax.set(xlabel="epoch", title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    return Path(out_path)


class ExperimentLogger:
    """Per-epoch stats to `output_dir/log.txt` (official JSON lines) and to the trackers `args` enables.

    Everything happens on global rank 0 only (official mlflow ran once per node). `start_step` is the
    step a resumed run starts from: TensorBoard hides the events an interrupted process wrote beyond it;
    wandb and mlflow cannot rewrite history, so there such points stay (wandb ignores the repeated steps).
    Hyperparameters are recorded when a run is created (wandb config, mlflow params, TensorBoard hparams);
    a resumed run keeps those. A tracker that cannot start ends the script with one line, after ending
    the runs already started.
    """

    def __init__(self, args, output_dir, start_step=0):
        self.output_dir = Path(output_dir) if output_dir else None
        self.active = utils.is_main_process()
        self.wandb = self.mlflow = self.tensorboard = None
        self._mlflow_created = False
        self._wandb_epoch_keys = set()
        self.log_best_checkpoint = getattr(args, "log_best_checkpoint", False)
        self.step = start_step
        if not self.active:
            return
        if self.output_dir:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        log_dir = getattr(args, "log_dir", None)
        # Every package is checked before any run starts, so a missing one leaves nothing behind.
        modules = {name: _import_optional(module, package, flag) for name, on, module, package, flag in (
            ("mlflow", getattr(args, "mlflow", False), "mlflow", "mlflow-skinny", "--mlflow"),
            ("wandb", getattr(args, "if_wandb", False), "wandb", "wandb", "--if_wandb"),
            ("tensorboard", log_dir or getattr(args, "tensorboard", False), "torch.utils.tensorboard",
             "tensorboard", "tensorboard logging")) if on}
        try:
            if "mlflow" in modules:
                self.mlflow = self._start_mlflow(modules["mlflow"], args)
            if "wandb" in modules:
                self.wandb = self._start_wandb(modules["wandb"], args)
        except BaseException:
            self._end_runs(failed=True)
            raise
        if "tensorboard" in modules:
            self.tensorboard = self._start_tensorboard(modules["tensorboard"], args, log_dir or self.output_dir)

    def _start_mlflow(self, mlflow, args):
        uri = os.environ.get("MLFLOW_TRACKING_URI") or Path("mlruns").resolve().as_uri()
        if _is_file_uri(uri):
            # mlflow >= 3 refuses file stores unless this is set (its sqlite default needs SQLAlchemy).
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        resume_id = getattr(args, "mlflow_resume", None) or None
        try:
            mlflow.set_tracking_uri(uri)
            run = mlflow.start_run(run_id=resume_id,
                                   run_name=None if resume_id else (self.output_dir.name if self.output_dir else None))
            self._mlflow_created = resume_id is None
            if resume_id is None:
                mlflow.log_params({k: str(v)[:500] for k, v in _plain_config(args).items()})
        except Exception as err:  # stores fail with MlflowException, connection and import errors alike
            self.mlflow = mlflow if mlflow.active_run() else None  # so that _end_runs removes a half-made run
            raise SystemExit(f"--mlflow: the tracking store {uri} refused the run: {_one_line(err)}") from None
        args.mlflow_resume = run.info.run_id
        return mlflow

    def _start_wandb(self, wandb, args):
        resume_id = getattr(args, "wandb_resume", None) or None
        try:
            run = wandb.init(project=getattr(args, "wandb_project", None), entity=getattr(args, "wandb_entity", None),
                             name=getattr(args, "wandb_name", None) or f"exp_{getattr(args, 'model', 'run')}",
                             id=resume_id, resume="allow" if resume_id else None,
                             config=None if resume_id else _plain_config(args),
                             dir=str(self.output_dir) if self.output_dir else None)
        except Exception as err:  # wandb raises its own error types for login/network/resume problems
            raise SystemExit(f"--if_wandb: wandb could not start a run ({_one_line(err)}); run `wandb login`, set "
                             f"WANDB_API_KEY, or set WANDB_MODE=offline to log locally") from None
        args.wandb_resume = run.id
        return run

    def _start_tensorboard(self, tensorboard, args, log_dir):
        writer = tensorboard.SummaryWriter(log_dir=log_dir, purge_step=self.step + 1 if self.step else None)
        if not self.step:
            config = {k: "None" if v is None else v for k, v in _plain_config(args).items()}
            for summary in tensorboard.summary.hparams(config, {}):
                writer.file_writer.add_summary(summary)
        return writer

    def _end_runs(self, failed=False):
        if self.wandb:
            self.wandb.finish(exit_code=1 if failed else 0)
        if self.mlflow:
            run_id = self.mlflow.active_run().info.run_id
            self.mlflow.end_run(status="FAILED" if failed else "FINISHED")
            if failed and self._mlflow_created:  # created by this start-up, never used: leave no empty run
                self.mlflow.delete_run(run_id)
        if self.tensorboard:
            self.tensorboard.close()
        self.wandb = self.mlflow = self.tensorboard = None

    def _send(self, metrics, step):
        self.step = step
        if self.wandb:
            self.wandb.log(metrics, step=step)
        if self.mlflow:
            self.mlflow.log_metrics(metrics, step=step)
        if self.tensorboard:
            for tag, value in metrics.items():
                self.tensorboard.add_scalar(tag, value, step)

    def log(self, stats, step):
        """One epoch's stats: a log.txt line, and metrics of the same names at `step` for the trackers."""
        if not self.active:
            return
        if self.output_dir:
            with (self.output_dir / "log.txt").open("a") as f:
                f.write(json.dumps(stats) + "\n")
        metrics = {k: float(v) for k, v in stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.wandb:
            for key in sorted(metrics.keys() - self._wandb_epoch_keys - {"epoch"}):
                self.wandb.define_metric(key, step_metric="epoch")  # panels against the epoch by default
            self._wandb_epoch_keys |= metrics.keys()
        if self.wandb or self.mlflow or self.tensorboard:
            self._send(metrics, step)

    def log_step(self, metrics, step):
        """Per-iteration scalars (the engine's `train/loss_step`, `train/lr`) at the global `step`."""
        if self.active and (self.wandb or self.mlflow or self.tensorboard):
            self._send(metrics, step)

    def _upload_curves(self, path):
        if self.wandb:  # a copy in the run's folder (wandb.save of an outside file symlinks it, with a warning)
            copy = Path(self.wandb.dir) / path.name
            shutil.copyfile(path, copy)
            self.wandb.save(str(copy), base_path=self.wandb.dir, policy="now")
        if self.mlflow:
            self.mlflow.log_artifact(str(path))
        if self.tensorboard:
            import numpy as np
            from PIL import Image
            with Image.open(path) as image:
                self.tensorboard.add_image("curves", np.asarray(image.convert("RGB")), self.step, dataformats="HWC")

    def _upload_checkpoint(self, path):
        if self.wandb:
            import wandb
            artifact = wandb.Artifact(f"model-{self.wandb.id}", type="model")
            artifact.add_file(str(path))
            self.wandb.log_artifact(artifact)
        if self.mlflow:
            self.mlflow.log_artifact(str(path), artifact_path="checkpoints")

    def close(self, checkpoint=None):
        """Draw curves.png next to log.txt, upload it (and `checkpoint` with --log-best-checkpoint) to the
        trackers, and finish them."""
        if not self.active:
            return
        log_path = self.output_dir / "log.txt" if self.output_dir else None
        curves = plot_curves(log_path, self.output_dir / "curves.png") if log_path and log_path.is_file() else None
        if curves:
            self._upload_curves(curves)
        if checkpoint and self.log_best_checkpoint and Path(checkpoint).is_file():
            self._upload_checkpoint(Path(checkpoint))
        self._end_runs()
