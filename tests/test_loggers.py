"""advarm.loggers: log.txt and curves.png, the shared tracker flags, refused stores, and a training resumed
once that stays one run in wandb, mlflow and TensorBoard (each store read back with its own library)."""
import argparse
import json
import os
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import main
import main_pretrain
from advarm import checkpoint, loggers, utils

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Finetuning"))
import main_finetune  # noqa: E402

EPOCHS = [{"train_lr": 1e-3, "train_loss": 2.0 - e / 2, "test_loss": 2.1 - e / 2, "test_acc1": 10.0 * e,
           "ema_test_acc1": 9.0 * e, "epoch": e, "n_parameters": 6} for e in range(3)]


@pytest.fixture
def tracker_env(tmp_path):
    """wandb offline and mlflow on a `file:` URI (MLFLOW_ALLOW_FILE_STORE unset, as a user has it), all
    state in tmp_path; the environment is restored afterwards (the logger sets the file-store variable)."""
    saved = dict(os.environ)
    os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_CONSOLE="off",
                      WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"), WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"),
                      WANDB_DATA_DIR=str(tmp_path / "wandb-data"), MLFLOW_TRACKING_URI=(tmp_path / "mlruns").as_uri())
    yield tmp_path
    os.environ.clear()
    os.environ.update(saved)


# ---------------------------------------------------------------------------------------------------
# log.txt, curves.png, flags


def test_experiment_logger_writes_official_log_and_curves(tmp_path):
    pytest.importorskip("matplotlib")
    logger = loggers.ExperimentLogger(argparse.Namespace(), tmp_path / "run")
    for stats in EPOCHS:
        logger.log(stats, step=stats["epoch"])
    logger.close()
    lines = (tmp_path / "run" / "log.txt").read_text().splitlines()
    assert [json.loads(line) for line in lines] == EPOCHS
    png = tmp_path / "run" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_curves_skipped_with_a_note_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    logger = loggers.ExperimentLogger(argparse.Namespace(), tmp_path)
    logger.log(EPOCHS[0], step=0)
    logger.close()
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert (tmp_path / "log.txt").is_file() and not (tmp_path / "curves.png").exists()


def test_logger_is_silent_on_other_ranks(tmp_path, monkeypatch):
    monkeypatch.setattr(utils, "is_main_process", lambda: False)
    logger = loggers.ExperimentLogger(argparse.Namespace(if_wandb=True, mlflow=True, tensorboard=True), tmp_path)
    logger.log(EPOCHS[0], step=0)
    logger.log_step({"train/lr": 0.1}, step=1)
    logger.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags, module, package", [
    ({"if_wandb": True}, "wandb", "wandb"),
    ({"mlflow": True}, "mlflow", "mlflow-skinny"),
    ({"log_dir": "tb"}, "torch.utils.tensorboard", "tensorboard"),
    ({"tensorboard": True}, "torch.utils.tensorboard", "tensorboard"),
])
def test_missing_optional_package_exits_with_the_pip_name(tmp_path, monkeypatch, flags, module, package):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(SystemExit, match=f"pip install {package}"):
        loggers.ExperimentLogger(argparse.Namespace(**flags), tmp_path)


LOGGER_ARGV = ["--if_wandb", "--wandb_resume", "w1", "--wandb_project", "p", "--wandb_entity", "e",
               "--wandb_name", "n", "--mlflow", "--mlflow_resume", "m1", "--tensorboard", "--log_dir", "tb",
               "--log-best-checkpoint"]
LOGGER_DESTS = ("if_wandb", "wandb_resume", "wandb_project", "wandb_entity", "wandb_name", "mlflow", "mlflow_resume",
                "tensorboard", "log_dir", "log_best_checkpoint")


def test_the_three_scripts_share_one_definition_of_the_logger_flags():
    parsers = {"main": main.get_args_parser(), "main_pretrain": main_pretrain.get_args_parser(),
               "main_finetune": main_finetune.get_args_parser()}
    given = {name: vars(p.parse_args(LOGGER_ARGV)) for name, p in parsers.items()}
    defaults = {name: vars(p.parse_args([])) for name, p in parsers.items()}
    for name in parsers:
        assert {k: given[name][k] for k in LOGGER_DESTS} == dict(
            if_wandb=True, wandb_resume="w1", wandb_project="p", wandb_entity="e", wandb_name="n", mlflow=True,
            mlflow_resume="m1", tensorboard=True, log_dir="tb", log_best_checkpoint=True), name
        assert not parsers[name].parse_args(["--if_wandb", "--disable_wandb"]).if_wandb
        # Official defaults: every tracker off; TensorBoard into ./output_dir for the ARM scripts only.
        assert {k: defaults[name][k] for k in LOGGER_DESTS} == dict(
            if_wandb=False, wandb_resume=None, wandb_project=None, wandb_entity=None, wandb_name=None, mlflow=False,
            mlflow_resume=None, tensorboard=False, log_dir=None if name == "main" else "./output_dir",
            log_best_checkpoint=False), name


def test_continue_runs_takes_the_checkpoint_ids_unless_given():
    stored = argparse.Namespace(wandb_resume="w-old", mlflow_resume="m-old")
    args = argparse.Namespace(wandb_resume=None, mlflow_resume="m-flag")
    loggers.continue_runs(args, {"args": stored})
    assert (args.wandb_resume, args.mlflow_resume) == ("w-old", "m-flag")
    loggers.continue_runs(args, {})  # an official checkpoint without args changes nothing
    assert (args.wandb_resume, args.mlflow_resume) == ("w-old", "m-flag")


# ---------------------------------------------------------------------------------------------------
# refused stores


def test_refused_mlflow_store_is_one_line_and_starts_nothing(tracker_env, monkeypatch):
    pytest.importorskip("mlflow")
    started = []
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: started.append(kw)))
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "false"  # the user's explicit refusal of file stores
    args = argparse.Namespace(mlflow=True, if_wandb=True, log_dir=str(tracker_env / "tb"))
    with pytest.raises(SystemExit) as exc:
        loggers.ExperimentLogger(args, tracker_env / "out")
    message = str(exc.value)
    assert message.startswith(f"--mlflow: the tracking store {(tracker_env / 'mlruns').as_uri()} refused the run")
    assert "MLFLOW_ALLOW_FILE_STORE" in message and "\n" not in message
    assert started == [] and not (tracker_env / "tb").exists()


def test_wandb_failure_ends_and_removes_the_mlflow_run_it_followed(tracker_env, monkeypatch):
    mlflow = pytest.importorskip("mlflow")

    def refuse(**kwargs):
        raise RuntimeError("No API key configured")

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=refuse))
    args = argparse.Namespace(mlflow=True, if_wandb=True)
    with pytest.raises(SystemExit, match="No API key configured.*WANDB_MODE=offline"):
        loggers.ExperimentLogger(args, tracker_env / "out")
    assert mlflow.active_run() is None
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []  # the empty run was deleted


# ---------------------------------------------------------------------------------------------------
# one training, resumed once, is one run in every tracker


def _wandb_records(path, block=32768):
    """The protobuf records of an offline `.wandb` file (wandb's header, then LevelDB log chunks)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, pending = Path(path).read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk of a record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _key(item):
    return item.key or "/".join(item.nested_key)


def _wandb_run(output_dir):
    """(run ids, [(step, {key: value})] over every offline folder in start order, files, artifact files)."""
    ids, history, files, artifacts, config = set(), [], set(), set(), {}
    for run_file in sorted(Path(output_dir).glob("wandb/offline-run-*/run-*.wandb")):
        for record in _wandb_records(run_file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
                config.update({_key(item): json.loads(item.value_json) for item in record.run.config.update})
            elif kind == "history":
                history.append((record.history.step.num,
                                {_key(item): json.loads(item.value_json) for item in record.history.item}))
            elif kind == "files":
                files.update(f.path for f in record.files.files)
            elif kind == "artifact":
                artifacts.update((record.artifact.type, entry.path) for entry in record.artifact.manifest.contents)
    return ids, history, files, artifacts, config


def _tensorboard(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def _assert_one_run_everywhere(output_dir, tb_dir, steps_per_epoch, epoch_keys, best_checkpoint=None):
    import mlflow

    last = 2 * steps_per_epoch
    ckpt_args = checkpoint.load_checkpoint_file(output_dir / "checkpoint-1.pth" if best_checkpoint is None
                                                else output_dir / "checkpoint.pth")["args"]

    # TensorBoard: one increasing axis per tag, per-step and per-epoch tags apart, hparams and curves.
    events = _tensorboard(tb_dir)
    tags = set(events.Tags()["scalars"])
    assert {"train/loss_step", "train/lr", "epoch", *epoch_keys} <= tags  # per-epoch keys: log.txt names
    for tag in tags:
        steps = [event.step for event in events.Scalars(tag)]
        assert steps == sorted(set(steps)), tag
    assert [e.step for e in events.Scalars("train/loss_step")] == list(range(1, last + 1))
    assert [(e.step, e.value) for e in events.Scalars("epoch")] == [(steps_per_epoch, 0.0), (last, 1.0)]
    assert "curves" in events.Tags()["images"]
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")

    # wandb: two offline folders (one per process) of the same run id, the step axis continuing.
    ids, history, files, artifacts, config = _wandb_run(output_dir)
    assert ids == {ckpt_args.wandb_resume} and len(list(output_dir.glob("wandb/offline-run-*"))) == 2
    steps = [step for step, _ in history]
    assert steps == sorted(steps) and steps[0] == 1 and steps[-1] == last
    assert [row["epoch"] for _, row in history if "epoch" in row] == [0, 1]
    assert [row["_step"] for _, row in history if "train/loss_step" in row] == list(range(1, last + 1))
    assert config["model"] == ckpt_args.model and "curves.png" in files
    if best_checkpoint:
        assert ("model", best_checkpoint) in artifacts

    # mlflow: one run holding both epochs, its params, curves.png (and the best checkpoint).
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")  # skinny: no pandas
    assert [(r.info.run_id, r.info.status) for r in runs] == [(ckpt_args.mlflow_resume, "FINISHED")]
    client = mlflow.MlflowClient()
    epoch_points = client.get_metric_history(ckpt_args.mlflow_resume, epoch_keys[0])
    assert [m.step for m in epoch_points] == [steps_per_epoch, last]
    assert [m.step for m in client.get_metric_history(ckpt_args.mlflow_resume, "train/loss_step")] == \
        list(range(1, last + 1))
    assert runs[0].data.params["model"] == ckpt_args.model
    stored = {a.path for a in client.list_artifacts(ckpt_args.mlflow_resume)}
    assert "curves.png" in stored
    if best_checkpoint:
        assert {a.path for a in client.list_artifacts(ckpt_args.mlflow_resume, "checkpoints")} == \
            {f"checkpoints/{best_checkpoint}"}


TRACKERS = ["--if_wandb", "--mlflow", "--tensorboard", "--wandb_project", "advarm-tests"]


@pytest.mark.slow
def test_main_resumed_once_is_one_run_in_every_tracker(tracker_env, one_thread):
    pytest.importorskip("wandb"), pytest.importorskip("mlflow"), pytest.importorskip("tensorboard")
    data = tracker_env / "data"
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 2)):
        for label in (0, 1):
            folder = data / split / str(label)
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tracker_env / "out"
    argv = ["--data-set", "FOLDER", "--data-path", str(data), "--model", "adventurer_tiny_patch16",
            "--model-kwargs", "depth=2", "embed_dim=32", "patch_size=8", "--input-size", "16", "--batch-size", "4",
            "--device", "cpu", "--num_workers", "0", "--reprob", "0", "--aa", "", "--amp", "none",
            "--max-iters-per-epoch", "2", "--output_dir", str(out), "--resume", "auto", *TRACKERS,
            "--log-best-checkpoint"]
    main.main(main.get_args_parser().parse_args(argv + ["--epochs", "1"]))
    main.main(main.get_args_parser().parse_args(argv + ["--epochs", "2"]))  # resumes checkpoint.pth of epoch 0
    assert [row["epoch"] for row in map(json.loads, (out / "log.txt").read_text().splitlines())] == [0, 1]
    _assert_one_run_everywhere(out, out, 2, ["test_acc1", "train_loss"], best_checkpoint="best_checkpoint.pth")


@pytest.mark.slow
def test_arm_pretraining_resumed_once_is_one_run_in_every_tracker(tracker_env, one_thread):
    pytest.importorskip("wandb"), pytest.importorskip("mlflow"), pytest.importorskip("tensorboard")
    out, tb = tracker_env / "out", tracker_env / "tb"
    argv = ["--device", "cpu", "--data-set", "DIGITS", "--input_size", "16", "--batch_size", "8", "--num_workers",
            "0", "--warmup_epochs", "1", "--lr", "2e-3", "--amp", "none", "--max-iters-per-epoch", "3",
            "--model-kwargs", "img_size=16", "patch_size=2", "depth=4", "embed_dim=16", "dec_embed_dim=32",
            "--output_dir", str(out), "--log_dir", str(tb), "--resume", "auto", *TRACKERS]
    main_pretrain.main(main_pretrain.get_args_parser().parse_args(argv + ["--epochs", "1"]))
    main_pretrain.main(main_pretrain.get_args_parser().parse_args(argv + ["--epochs", "2"]))
    _assert_one_run_everywhere(out, tb, 3, ["train_loss", "train_lr"])


def test_tensorboard_resume_hides_what_the_interrupted_process_wrote_after_the_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    args = argparse.Namespace(tensorboard=True, lr=0.1)
    first = loggers.ExperimentLogger(args, tmp_path)
    for step in range(1, 6):  # killed after step 5; its checkpoint holds step 3
        first.log_step({"train/loss_step": float(step)}, step)
    first.close()
    resumed = loggers.ExperimentLogger(args, tmp_path, start_step=3)
    for step in range(4, 7):
        resumed.log_step({"train/loss_step": 10.0 + step}, step)
    resumed.close()
    points = [(e.step, e.value) for e in _tensorboard(tmp_path).Scalars("train/loss_step")]
    assert points == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0), (6, 16.0)]
