"""main_pretrain.py: official command lines parse, a tiny run learns and checkpoints, resume, DDP, errors."""
import json
import os
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main_pretrain
from advarm import checkpoint

ROOT = Path(__file__).resolve().parents[1]

# The two pretraining commands of the official ARM README, verbatim.
README_PRETRAIN = [
    """torchrun --standalone --nproc_per_node=8 --master_port 1221 main_pretrain.py \\
--batch_size 256 \\
    --model arm_base_pz16 \\
    --norm_pix_loss \\
    --epochs 1600 \\
    --warmup_epochs 40 \\
    --blr 1.5e-4 --weight_decay 0.05 \\
    --data_path /path/to/ImageNet/ --output_dir ./out_b/""",
    """torchrun --standalone --nproc_per_node=8 --master_port 1221 main_pretrain.py \\
--batch_size 128 \\
    --model arm_large_pz16 \\
    --norm_pix_loss \\
    --epochs 1600 \\
    --warmup_epochs 40 \\
    --blr 1.5e-4 --weight_decay 0.05 \\
    --data_path /path/to/ImageNet/ --output_dir ./out_l/""",
]

# 16 px digits, 2 px patches: an 8x8 grid = 2x2 clusters of 4x4 patches, 48 encoder tokens.
TINY = ["--device", "cpu", "--data-set", "DIGITS", "--input_size", "16", "--batch_size", "8",
        "--num_workers", "0", "--log_dir", "", "--warmup_epochs", "1", "--lr", "2e-3",
        "--model-kwargs", "img_size=16", "patch_size=2", "depth=4", "embed_dim=16", "dec_embed_dim=32"]


def script_args(command):
    """The arguments after the script name of a shell command line (bash drops backslash-newlines)."""
    words = shlex.split(command.replace("\\\n", ""))
    return words[next(i for i, w in enumerate(words) if w.endswith(".py")) + 1:]


def run(argv):
    main_pretrain.main(main_pretrain.get_args_parser().parse_args(argv))


def log_rows(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "log.txt").read_text().splitlines()]


@pytest.mark.parametrize("command", README_PRETRAIN, ids=["base", "large"])
def test_readme_commands_parse(command):
    args = main_pretrain.get_args_parser().parse_args(script_args(command))
    assert args.model in ("arm_base_pz16", "arm_large_pz16")
    assert args.batch_size in (256, 128) and args.epochs == 1600 and args.warmup_epochs == 40
    assert args.blr == 1.5e-4 and args.weight_decay == 0.05 and args.norm_pix_loss
    assert args.data_path == "/path/to/ImageNet/" and args.data_set == "IMNET"
    # Untouched official defaults.
    assert (args.clip_grad, args.input_size, args.min_lr, args.lr, args.accum_iter) == (3.0, 192, 0.0, None, 1)
    assert args.save_every == 20 and not args.official_epoch_fields and args.amp == "bfloat16"


@pytest.mark.parametrize("flag", ["--local-rank=3", "--local_rank=3"])
def test_both_local_rank_spellings(flag):
    assert main_pretrain.get_args_parser().parse_args([flag]).local_rank == 3


def test_model_kwargs_are_literals(capsys):
    args = main_pretrain.get_args_parser().parse_args(
        ["--model-kwargs", "img_size=48", "drop_rate=0.5", "bimamba_type=None", "tap_layers=(1,2,3,4)", "name=x"])
    assert args.model_kwargs == dict(img_size=48, drop_rate=0.5, bimamba_type=None, tap_layers=(1, 2, 3, 4), name="x")
    with pytest.raises(SystemExit):
        main_pretrain.get_args_parser().parse_args(["--model-kwargs", "img_size"])
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.endswith("error: argument --model-kwargs: expected KEY=VALUE, got 'img_size'")


def test_training_lowers_loss_and_writes_checkpoints(tmp_path):
    run(TINY + ["--epochs", "3", "--max-iters-per-epoch", "6", "--output_dir", str(tmp_path)])
    rows = log_rows(tmp_path)
    assert [row["epoch"] for row in rows] == [0, 1, 2]
    assert set(rows[0]) == {"train_loss", "train_lr", "epoch"}
    assert rows[2]["train_loss"] < rows[0]["train_loss"] - 0.1
    assert {p.name for p in tmp_path.glob("checkpoint*.pth")} == {
        "checkpoint-0.pth", "checkpoint-2.pth", "checkpoint--1.pth"}
    rolling = checkpoint.load_checkpoint_file(tmp_path / "checkpoint--1.pth")
    assert rolling["epoch"] == 2  # the real epoch, not the official -1
    assert set(rolling) >= {"model", "optimizer", "scaler", "args"}
    assert torch.equal(rolling["model"]["ar_token"], checkpoint.load_checkpoint_file(
        tmp_path / "checkpoint-2.pth")["model"]["ar_token"])
    # Official optimiser groups: no decay on 1-D tensors and biases, decay (A_log included) on the rest.
    groups = rolling["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.0, 0.05] and groups[0]["betas"] == (0.9, 0.95)


def test_resume_auto_continues_with_optimizer_state(tmp_path):
    first = TINY + ["--max-iters-per-epoch", "2", "--output_dir", str(tmp_path)]
    run(first + ["--epochs", "1"])
    run(first + ["--epochs", "2", "--resume", "auto"])  # as if the first job had been killed after epoch 0
    assert [row["epoch"] for row in log_rows(tmp_path)] == [0, 1]
    state = checkpoint.load_checkpoint_file(tmp_path / "checkpoint-1.pth")["optimizer"]["state"]
    assert {float(s["step"]) for s in state.values()} == {4.0}  # 2 restored steps + 2 new ones


def test_official_epoch_fields_opt_in(tmp_path):
    run(TINY + ["--epochs", "1", "--max-iters-per-epoch", "1", "--official-epoch-fields",
                "--output_dir", str(tmp_path)])
    assert checkpoint.load_checkpoint_file(tmp_path / "checkpoint--1.pth")["epoch"] == -1
    assert checkpoint.load_checkpoint_file(tmp_path / "checkpoint-0.pth")["epoch"] == 0


def run_as_script(argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["main_pretrain.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "main_pretrain.py"), run_name="__main__")
    return str(exit_info.value.code)


def test_bad_input_gives_one_line(tmp_path, monkeypatch):
    message = run_as_script(TINY + ["--model", "arm_tiny", "--output_dir", str(tmp_path)], monkeypatch)
    assert "arm_tiny" in message and "arm_base_pz16" in message and "\n" not in message
    message = run_as_script(TINY[:2] + ["--data_path", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path)],
                            monkeypatch)
    assert message.startswith("error:") and "nowhere" in message and "\n" not in message
    message = run_as_script(TINY + ["--input_size", "24", "--output_dir", str(tmp_path)], monkeypatch)
    assert "--input_size 24" in message and "img_size 16" in message
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    message = run_as_script(TINY + ["--resume", str(tmp_path / "broken.pth"), "--output_dir", str(tmp_path)],
                            monkeypatch)
    assert message.startswith("error:") and "broken.pth" in message


def test_two_process_gloo_run_stays_in_sync(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "main_pretrain.py",
         *TINY, "--epochs", "1", "--max-iters-per-epoch", "2", "--output_dir", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("parameter checksum per rank"))
    values = json.loads(line.split(": ", 1)[1].split(" (")[0])
    assert len(values) == 2 and values[0] == values[1] and "in sync" in line
    assert (tmp_path / "checkpoint-0.pth").is_file()


def test_wd_skip_ssm_moves_a_log_out_of_decay():
    parser = main_pretrain.get_args_parser()
    model = main_pretrain.build_model(parser.parse_args(TINY))
    names = {id(p): n for n, p in model.named_parameters()}
    official, skipping = (main_pretrain.weight_decay_groups(model, parser.parse_args(TINY + flags))
                          for flags in ([], ["--wd-skip-ssm"]))
    decayed = [{names[id(p)] for p in groups[1]["params"]} for groups in (official, skipping)]
    assert "layers.0.mixer.A_log" in decayed[0] and "ar_token" in decayed[0]  # official (SPEC 9 item 9)
    assert decayed[1] == {n for n in decayed[0] if not n.endswith("A_log")}
