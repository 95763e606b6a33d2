"""Experiment logging: per-epoch JSON lines in log.txt, curves.png, and the optional trackers (wandb,
mlflow, TensorBoard), each imported only when its flag asks for it.
"""
import importlib
import json
import os
from pathlib import Path

from advarm import utils


def _import_optional(module, package, flag):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SystemExit(f"{flag} needs the optional package '{package}': pip install {package}") from None


def _plain_config(args):
    """args as JSON-friendly values for the trackers' config/params."""
    return {k: v if isinstance(v, (bool, int, float, str, type(None))) else str(v) for k, v in vars(args).items()}


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
    """Per-epoch stats to `output_dir/log.txt` (official JSON lines) and the trackers `args` enables.

    Everything happens on global rank 0 only (official mlflow ran once per node). Sinks:
    `args.if_wandb` (set WANDB_MODE=offline to run without an account; the run id is stored in
    `args.wandb_resume` so a resumed checkpoint continues the same run), `args.mlflow` (local ./mlruns file
    store unless MLFLOW_TRACKING_URI is set; run name = last component of output_dir), tensorboard when
    `args.log_dir` is non-empty or `args.tensorboard` is set. `add_scalar` lets the engine log per step.
    """

    def __init__(self, args, output_dir):
        self.output_dir = Path(output_dir) if output_dir else None
        self.active = utils.is_main_process()
        self.wandb = self.mlflow = self.tensorboard = None
        if not self.active:
            return
        if self.output_dir:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        if getattr(args, "if_wandb", False):
            self.wandb = self._start_wandb(args)
        if getattr(args, "mlflow", False):
            self.mlflow = self._start_mlflow(args)
        log_dir = getattr(args, "log_dir", None)
        if log_dir or getattr(args, "tensorboard", False):
            tensorboard = _import_optional("torch.utils.tensorboard", "tensorboard", "tensorboard logging")
            self.tensorboard = tensorboard.SummaryWriter(log_dir=log_dir or self.output_dir)

    def _start_wandb(self, args):
        wandb = _import_optional("wandb", "wandb", "--if_wandb")
        resume_id = getattr(args, "wandb_resume", None)
        try:
            run = wandb.init(project=getattr(args, "wandb_project", None), name=f"exp_{getattr(args, 'model', 'run')}",
                             id=resume_id, resume="must" if resume_id else None, config=_plain_config(args),
                             dir=str(self.output_dir) if self.output_dir else None)
        except Exception as err:  # wandb raises its own error types for login/network/resume problems
            raise SystemExit(f"--if_wandb: wandb could not start a run ({err}); run `wandb login`, set "
                             f"WANDB_API_KEY, or set WANDB_MODE=offline to log locally") from None
        args.wandb_resume = run.id
        return wandb

    def _start_mlflow(self, args):
        mlflow = _import_optional("mlflow", "mlflow-skinny", "--mlflow")
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # mlflow >= 3 defaults to sqlite (needs SQLAlchemy) and gates the file store behind this variable.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri(Path("mlruns").resolve().as_uri())
        mlflow.start_run(run_name=self.output_dir.name if self.output_dir else None)
        mlflow.log_params({k: str(v)[:500] for k, v in _plain_config(args).items()})
        return mlflow

    def log(self, stats, step):
        """One epoch's stats: a log.txt line, and metrics at `step` for the trackers."""
        if not self.active:
            return
        if self.output_dir:
            with (self.output_dir / "log.txt").open("a") as f:
                f.write(json.dumps(stats) + "\n")
        numbers = {k: float(v) for k, v in stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.wandb:
            self.wandb.log(stats)
        if self.mlflow:
            self.mlflow.log_metrics(numbers, step=step)
        if self.tensorboard:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(key, value, step)

    def add_scalar(self, tag, value, step):
        """Per-iteration scalar (ARM engines log loss/lr this way); tensorboard only, like the official code."""
        if self.active and self.tensorboard:
            self.tensorboard.add_scalar(tag, value, step)

    def close(self):
        """Finish the trackers and draw curves.png next to log.txt."""
        if not self.active:
            return
        if self.wandb:
            self.wandb.finish()
        if self.mlflow:
            self.mlflow.end_run()
        if self.tensorboard:
            self.tensorboard.close()
        log_path = self.output_dir / "log.txt" if self.output_dir else None
        if log_path and log_path.is_file():
            plot_curves(log_path, self.output_dir / "curves.png")
