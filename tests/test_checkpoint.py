"""advarm.checkpoint: container formats, readable errors, atomic saves, --resume auto, pos-embed resizing."""
import argparse
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advarm import checkpoint
from advarm.checkpoint import CheckpointError


class Tiny(nn.Module):
    def __init__(self, hidden=4):
        super().__init__()
        self.fc1 = nn.Linear(3, hidden)
        self.fc2 = nn.Linear(hidden, 2)
        self.register_buffer("scale", torch.ones(2))


def same_weights(a, b):
    return all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


@pytest.mark.parametrize("layout", ["bare", "model", "model_ema", "state_dict", "module_prefix", "official"])
def test_container_round_trip(tmp_path, layout):
    torch.manual_seed(0)
    source = Tiny()
    sd = source.state_dict()
    obj = {
        "bare": sd,
        "model": {"model": sd, "epoch": 3},
        "model_ema": {"model_ema": sd},
        "state_dict": {"state_dict": sd, "arch": "tiny"},
        "module_prefix": {"model": {f"module.{k}": v for k, v in sd.items()}},
        # Official training container: args pickled as a Namespace, scaler as the string 'none'.
        "official": {"model": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 7,
                     "model_ema": None, "scaler": "none", "args": argparse.Namespace(lr=1e-3, model="tiny")},
    }[layout]
    path = checkpoint.save_checkpoint(obj, tmp_path / "ckpt.pth")
    target = Tiny()
    checkpoint.load_weights(target, path)
    assert same_weights(source, target)
    if layout == "official":
        assert checkpoint.load_checkpoint_file(path)["args"].lr == 1e-3


def test_explicit_key_picks_ema_and_names_missing_entry(tmp_path):
    raw, ema = Tiny(), Tiny()
    path = checkpoint.save_checkpoint({"model": raw.state_dict(), "model_ema": ema.state_dict()}, tmp_path / "c.pth")
    target = Tiny()
    checkpoint.load_weights(target, path, key="model_ema")
    assert same_weights(ema, target)
    with pytest.raises(CheckpointError, match="no 'state_dict_ema' entry"):
        checkpoint.load_weights(target, path, key="state_dict_ema")


def test_safetensors_round_trip(tmp_path):
    source = Tiny()
    path = checkpoint.save_checkpoint(source.state_dict(), tmp_path / "w.safetensors")
    target = Tiny()
    checkpoint.load_weights(target, path)
    assert same_weights(source, target)
    with pytest.raises(CheckpointError, match="bare state dict"):
        checkpoint.save_checkpoint({"model": source.state_dict()}, tmp_path / "x.safetensors")


def test_mismatch_message_lists_every_problem():
    sd = Tiny(hidden=5).state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["scale"]
    with pytest.raises(CheckpointError) as err:
        checkpoint.load_state_dict_strict(Tiny(), sd, source="x.pth")
    message = str(err.value)
    assert "x.pth" in message and "1 missing keys: scale" in message and "1 unexpected keys: extra.weight" in message
    assert "fc1.weight (checkpoint (5, 3) vs model (4, 3))" in message


def test_non_strict_allows_missing_but_not_wrong_shapes():
    sd = Tiny().state_dict()
    del sd["scale"]
    missing, unexpected = checkpoint.load_state_dict_strict(Tiny(), sd, strict=False)
    assert missing == ["scale"] and unexpected == []
    with pytest.raises(CheckpointError, match="wrong-shape"):
        checkpoint.load_state_dict_strict(Tiny(), Tiny(hidden=6).state_dict(), strict=False)


def test_long_key_lists_are_truncated_with_a_count():
    model = nn.Sequential(*[nn.Linear(1, 1) for _ in range(20)])
    with pytest.raises(CheckpointError, match=r"40 missing keys: .*\(\+30 more\)"):
        checkpoint.load_state_dict_strict(model, {})


@pytest.mark.parametrize("content, problem", [
    (None, "no such checkpoint file"),
    (b"", "empty file"),
    ("truncate", "truncated or corrupt"),
    (b"not a checkpoint at all", "not a torch checkpoint"),
])
def test_unreadable_files_name_path_and_problem(tmp_path, content, problem):
    path = tmp_path / "bad.pth"
    if content == "truncate":
        torch.save({"model": Tiny().state_dict()}, path)
        path.write_bytes(path.read_bytes()[:-200])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=problem) as err:
        checkpoint.load_checkpoint_file(path)
    assert str(path) in str(err.value)


def test_corrupt_safetensors_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="safetensors"):
        checkpoint.load_checkpoint_file(path)


class Opaque:
    """A class safe loading must refuse."""


def test_unsafe_pickle_is_refused_unless_trusted(tmp_path):
    path = tmp_path / "unsafe.pth"
    torch.save({"model": Tiny().state_dict(), "extra": Opaque()}, path)
    with pytest.raises(CheckpointError, match=r"refuses .*Opaque.*trusted=True"):
        checkpoint.load_checkpoint_file(path)
    with pytest.warns(UserWarning, match="trusted"):
        assert isinstance(checkpoint.load_checkpoint_file(path, trusted=True)["extra"], Opaque)


def test_failed_save_leaves_previous_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    checkpoint.save_checkpoint({"epoch": 1}, path)
    real_save = torch.save

    def save_then_fail(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(CheckpointError, match="cannot write .*checkpoint.pth: disk full"):
        checkpoint.save_checkpoint({"epoch": 2}, path)
    assert os.listdir(tmp_path) == ["checkpoint.pth"]
    assert checkpoint.load_checkpoint_file(path)["epoch"] == 1


def test_saved_file_has_the_permissions_of_a_plain_write(tmp_path):
    """Atomic saves go through mkstemp (0600); the result must stay readable like a torch.save file."""
    plain = tmp_path / "plain.pth"
    torch.save({"epoch": 0}, plain)
    saved = checkpoint.save_checkpoint({"epoch": 0}, tmp_path / "atomic.pth")
    assert oct(saved.stat().st_mode & 0o777) == oct(plain.stat().st_mode & 0o777)


def test_latest_checkpoint_by_epoch_then_mtime_skipping_incomplete(tmp_path):
    assert checkpoint.latest_checkpoint(tmp_path / "missing") is None
    assert checkpoint.latest_checkpoint(tmp_path) is None
    for name, epoch in [("checkpoint-20.pth", 20), ("checkpoint--1.pth", -1), ("checkpoint--10.pth", -10)]:
        checkpoint.save_checkpoint({"epoch": epoch}, tmp_path / name)
    assert checkpoint.latest_checkpoint(tmp_path).name == "checkpoint-20.pth"
    # Same epoch: the more recently written file wins.
    checkpoint.save_checkpoint({"epoch": 20}, tmp_path / "checkpoint.pth")
    os.utime(tmp_path / "checkpoint-20.pth", (1, 1))
    assert checkpoint.latest_checkpoint(tmp_path).name == "checkpoint.pth"
    # A later but truncated file (killed mid-copy) and a temp file from an interrupted save are ignored.
    torch.save({"epoch": 40}, tmp_path / "checkpoint-40.pth")
    data = (tmp_path / "checkpoint-40.pth").read_bytes()
    (tmp_path / "checkpoint-40.pth").write_bytes(data[: len(data) // 2])
    torch.save({"epoch": 50}, tmp_path / ".checkpoint-50.pth.abc.tmp")
    assert checkpoint.latest_checkpoint(tmp_path).name == "checkpoint.pth"


def official_adventurer_resize(table, new):
    """SPEC 6.4 as written: first token kept as 'extra', the rest bicubic-resized."""
    extra, grid = table[:, :1], table[:, 1:]
    old = int((grid.shape[1]) ** 0.5)
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat([extra, grid.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


def official_arm_transfer(table, new):
    """SPEC 4.4 step 3: cls-free 12x12 table resized, zero vector inserted at N//2."""
    old = int(table.shape[1] ** 0.5)
    grid = table.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).flatten(1, 2)
    n = grid.shape[1]
    return torch.cat([grid[:, : n // 2], torch.zeros(1, 1, table.shape[-1]), grid[:, n // 2:]], dim=1)


def test_resize_first_reproduces_official_shifted_finetune():
    table = torch.randn(1, 8 * 8 + 1, 6)
    ours = checkpoint.resize_pos_embed(table, (14, 14), cls_position="first")
    assert ours.shape == (1, 197, 6)
    torch.testing.assert_close(ours, official_adventurer_resize(table, 14), rtol=0, atol=0)


def test_resize_none_plus_zero_token_reproduces_official_arm_transfer():
    table = torch.randn(1, 144, 6)
    resized = checkpoint.resize_pos_embed(table, 14, cls_position="none")
    ours = checkpoint.insert_token(resized, resized.shape[1] // 2)
    torch.testing.assert_close(ours, official_arm_transfer(table, 14), rtol=0, atol=0)


@pytest.mark.parametrize("cls_position, old_index, new_index", [("last", -1, -1), ("first", 0, 0), ("middle", 32, 98)])
def test_resize_keeps_cls_vector_and_resamples_the_grid(cls_position, old_index, new_index):
    table = torch.randn(1, 65, 6)
    resized = checkpoint.resize_pos_embed(table, (14, 14), cls_position=cls_position)
    assert resized.shape == (1, 197, 6)
    torch.testing.assert_close(resized[:, new_index], table[:, old_index], rtol=0, atol=0)
    # The grid part equals a cls-free resize of the grid tokens alone.
    keep = [i for i in range(65) if i != old_index % 65]
    grid = checkpoint.resize_pos_embed(table[:, keep], (14, 14), cls_position="none")
    new_keep = [i for i in range(197) if i != new_index % 197]
    torch.testing.assert_close(resized[:, new_keep], grid, rtol=0, atol=0)


@pytest.mark.parametrize("cls_position", ["last", "first", "middle", "none"])
def test_resize_same_size_is_identity(cls_position):
    table = torch.randn(1, 196 + (cls_position != "none"), 6)
    assert torch.equal(checkpoint.resize_pos_embed(table, (14, 14), cls_position=cls_position), table)


def test_resize_rejects_a_non_square_table_and_bad_position():
    with pytest.raises(CheckpointError, match="not a square"):
        checkpoint.resize_pos_embed(torch.randn(1, 66, 6), (14, 14))
    with pytest.raises(ValueError, match="cls_position"):
        checkpoint.resize_pos_embed(torch.randn(1, 65, 6), (14, 14), cls_position="centre")
    resized = checkpoint.resize_pos_embed(torch.randn(1, 4 * 6 + 1, 6), (8, 12), old_grid=(4, 6))
    assert resized.shape == (1, 97, 6)


def test_save_syncs_the_folder_after_the_rename(tmp_path, monkeypatch):
    synced = []
    real_fsync_dir = checkpoint._fsync_dir
    monkeypatch.setattr(checkpoint, "_fsync_dir", lambda folder: (synced.append(Path(folder)), real_fsync_dir(folder)))
    checkpoint.save_checkpoint({"w": torch.ones(2)}, tmp_path / "run" / "checkpoint.pth")
    assert synced == [tmp_path / "run"]


def test_resume_auto_stops_at_an_unreadable_newest_file_and_notes_older_ones(tmp_path, capsys):
    checkpoint.save_checkpoint({"epoch": 3, "sampler": {"epoch": 4, "position": 32}}, tmp_path / "checkpoint.pth")
    checkpoint.save_checkpoint({"epoch": 9}, tmp_path / "checkpoint--10.pth")  # a best copy: never resumed from
    (tmp_path / "checkpoint-0.pth").write_bytes(b"junk")
    os.utime(tmp_path / "checkpoint-0.pth", (1, 1))
    assert checkpoint.resolve_resume("auto", tmp_path) == str(tmp_path / "checkpoint.pth")
    assert "skips an older unreadable file: " + str(tmp_path / "checkpoint-0.pth") in capsys.readouterr().out
    (tmp_path / "checkpoint-5.pth").write_bytes(b"")  # newer than checkpoint.pth
    with pytest.raises(CheckpointError, match="checkpoint-5.pth: empty file .*newest checkpoint.*move it away to "
                                              "resume from checkpoint.pth"):
        checkpoint.resolve_resume("auto", tmp_path)
    assert checkpoint.latest_checkpoint(tmp_path).name == "checkpoint.pth"  # the launcher's look-up still works


def test_stale_temp_files_are_removed(tmp_path):
    for name in (".checkpoint.pth.abc.tmp", ".w.safetensors.x.tmp", "keep.tmp", "checkpoint.pth"):
        (tmp_path / name).write_bytes(b"")
    removed = checkpoint.remove_stale_temp_files(tmp_path)
    assert sorted(p.name for p in removed) == [".checkpoint.pth.abc.tmp", ".w.safetensors.x.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth", "keep.tmp"]
