"""Adventurer: official outputs and state-dict layout, timm registration and pretrained loading, timm API."""
import argparse
import math
import pathlib
import warnings
from collections import defaultdict

import pytest
import timm
import torch
from conftest import golden_cases
from safetensors.torch import save_file
from timm.layers import DropPath, resample_abs_pos_embed
from timm.optim import param_groups_layer_decay

import models_adventurer  # noqa: F401  (registers the models with timm)
from models_adventurer import Adventurer, checkpoint_filter_fn

SMALL = dict(img_size=32, patch_size=8, depth=4, embed_dim=64, num_classes=5)  # 4x4 grid, N = 16


def small_model(**overrides):
    torch.manual_seed(0)
    return Adventurer(**dict(SMALL, **overrides))


def test_golden_cases_exist():
    assert len(golden_cases("adventurer")) in (0, 3)  # 0 only where ../shared is absent


@pytest.mark.parametrize("name", golden_cases("adventurer"))
def test_golden_logits(golden, name):
    case = golden(name)
    model = Adventurer(**case["kwargs"]).eval()
    model.load_state_dict(case["state_dict"], strict=True)
    with torch.no_grad():
        logits = model(case["input"])
    assert torch.allclose(logits, case["output"], rtol=1e-4, atol=1e-4)


def test_flip_rule_changes_logits(golden):
    case = golden("adventurer_a")
    model = Adventurer(**case["kwargs"], flip_rule="every_two").eval()
    model.load_state_dict(case["state_dict"], strict=True)
    with torch.no_grad():
        logits = model(case["input"])
    assert (logits - case["output"]).abs().max() > 0.1


def test_flip_schedules():
    assert [b.flip for b in small_model(depth=6).layers] == [False, False, True, True, False, False]
    assert [b.flip for b in small_model(depth=6, flip_rule="every_two").layers] == [False, True] * 3
    with pytest.raises(ValueError, match="flip_rule"):
        small_model(flip_rule="odd")


def _adventurer_variants(keys_table):
    variants = defaultdict(list)
    for row in keys_table:
        if row["family"] == "adv":
            variants[row["model_variant"]].append(row)
    return variants


def test_state_dict_layout_matches_official(keys_table):
    variants = _adventurer_variants(keys_table)
    assert len(variants) == 9
    for variant, rows in variants.items():
        name, size = variant.split("@")
        with torch.device("meta"):
            model = timm.create_model(name, img_size=int(size))
        ours = [(k, "x".join(map(str, v.shape)), str(v.dtype).replace("torch.", ""))
                for k, v in model.state_dict().items()]
        official = [(r["key"], r["shape"], r["dtype"]) for r in sorted(rows, key=lambda r: int(r["index"]))]
        assert ours == official, variant


@pytest.mark.parametrize("name, size, count", [
    ("adventurer_tiny_patch16", 224, 11_608_840),
    ("adventurer_small_patch16", 224, 44_491_816),
    ("adventurer_base_patch16", 224, 98_657_608),
    ("adventurer_base_patch16", 384, 98_949_448),
    ("adventurer_base_patch16", 448, 99_109_192),
    ("adventurer_base_patch16", 128, 98_556_232),
    ("adventurer_base_patch8", 224, 98_666_824),
    ("adventurer_base_patch8", 448, 100_473_160),
    ("adventurer_large_patch16", 224, 346_196_200),
])
def test_parameter_counts(name, size, count):
    with torch.device("meta"):
        model = timm.create_model(name, img_size=size)
    assert sum(p.numel() for p in model.parameters()) == count


@pytest.mark.parametrize("name, tokens, file, crop_pct", [
    ("adventurer_base_patch16_224", 197, "adventurer_base_patch16_224.pth", 0.875),
    ("adventurer_tiny_patch16_224", 197, "adventurer_tiny_patch16_224.pth", 0.875),
    ("adventurer_base_patch16_384", 577, "adventurer_base_patch16_384.pth", 1.0),
    ("adventurer_base_patch16_448", 785, "adventurer_base_patch16_448.pth", 1.0),
    ("adventurer_base_patch8_224", 785, "adventurer_base_patch8_224.pth", 1.0),
    ("adventurer_base_patch8_448", 3137, "adventurer_base_patch8_448.pth", 1.0),
    ("adventurer_base_patch16.in1k_384", 577, "adventurer_base_patch16_384.pth", 1.0),
    ("adventurer_large_patch16", 197, "adventurer_large_patch16_224.pth", 0.875),
])
def test_registered_names_and_pretrained_cfgs(name, tokens, file, crop_pct):
    with torch.device("meta"):
        model = timm.create_model(name)
    cfg = model.pretrained_cfg
    assert model.pos_embed.shape[1] == tokens
    assert (cfg["hf_hub_id"], cfg["hf_hub_filename"], cfg["crop_pct"]) == ("Wangf3014/Adventurer", file, crop_pct)
    assert cfg["input_size"][1] == model.patch_embed.img_size
    assert (cfg["interpolation"], cfg["first_conv"], cfg["classifier"]) == ("bicubic", "patch_embed.proj", "head")


def test_eight_released_files_have_cfgs():
    files = {timm.models.get_pretrained_cfg(n).hf_hub_filename for n in timm.list_pretrained("adventurer*")}
    assert len(files) == 8


def _official_checkpoint(model, path, **extra):
    sd = model.state_dict()
    args = argparse.Namespace(model="adventurer", output_dir=pathlib.PosixPath("/ckpt/%j"), input_size=32)
    torch.save({"model": sd, "model_ema": {k: v + 1.0 for k, v in sd.items()}, "epoch": 299,
                "scaler": "none", "args": args, **extra}, path)
    return sd


def _equal_state(model, sd, skip=()):
    return all(torch.equal(v, sd[k]) for k, v in model.state_dict().items() if k not in skip)


def test_pretrained_from_official_pth(tmp_path):
    path = tmp_path / "adventurer_small.pth"
    sd = _official_checkpoint(small_model(), path)
    model = timm.create_model("adventurer_tiny_patch16", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              **SMALL)
    assert _equal_state(model, sd)  # the `model` entry (what official evaluation reads), not model_ema
    ema = small_model()
    ema.load_pretrained(path, key="model_ema")
    assert torch.equal(ema.head.bias, sd["head.bias"] + 1)


def test_pretrained_from_safetensors_and_other_class_count(tmp_path):
    sd = small_model().state_dict()
    path = tmp_path / "weights.safetensors"
    save_file(sd, str(path))
    model = timm.create_model("adventurer_tiny_patch16", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              **SMALL)
    assert _equal_state(model, sd)
    other = timm.create_model("adventurer_tiny_patch16", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path)), **dict(SMALL, num_classes=3))
    assert other.head.weight.shape == (3, 64)
    assert _equal_state(other, sd, skip=("head.weight", "head.bias"))


def test_filter_unwraps_containers_and_resizes_pos_embed_cls_last():
    source = small_model()  # 4x4 grid
    sd = {f"module.{k}": v for k, v in source.state_dict().items()}
    target = small_model(img_size=48)  # 6x6 grid
    filtered = checkpoint_filter_fn({"model": sd, "args": argparse.Namespace()}, target)
    assert set(filtered) == set(target.state_dict())
    pos = source.pos_embed.detach()
    assert filtered["pos_embed"].shape == (1, 37, 64)
    assert torch.equal(filtered["pos_embed"][:, -1], pos[:, -1])  # the class-token slot stays last
    grid = resample_abs_pos_embed(pos[:, :-1], [6, 6], [4, 4], num_prefix_tokens=0, interpolation="bicubic",
                                  antialias=False)
    torch.testing.assert_close(filtered["pos_embed"][:, :-1], grid)
    same = checkpoint_filter_fn(source.state_dict(), small_model())
    assert torch.equal(same["pos_embed"], pos)


def test_features_and_heads():
    model = small_model().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape == (2, 17, 64)
        torch.testing.assert_close(tokens.pow(2).mean(-1), torch.ones(2, 17), rtol=1e-3, atol=1e-3)  # RMS-normed
        features = model(x, return_features=True)
        assert torch.equal(features, tokens[:, -1])  # the class token is the last one
        torch.testing.assert_close(model(x), model.head(features))
        model.reset_classifier(3, global_pool="avg")
        assert model(x).shape == (2, 3)
        torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), tokens[:, :-1].mean(1))
        model.reset_classifier(0)
        assert model(x).shape == (2, 64)
    assert (model.num_features, model.head_hidden_size, model.embed_dim, model.num_prefix_tokens) == (64, 64, 64, 1)
    with pytest.raises(ValueError, match="img_size=48"):
        model(torch.randn(1, 3, 48, 48))


def test_forward_intermediates():
    model = small_model().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, indices=[1, -1], norm=True, return_prefix_tokens=True)
        torch.testing.assert_close(final, model.forward_features(x))
        assert len(inter) == 2 and inter[0][0].shape == (2, 64, 4, 4) and inter[0][1].shape == (2, 1, 64)
        patches, cls = inter[1]
        torch.testing.assert_close(patches, final[:, :-1].reshape(2, 4, 4, 64).permute(0, 3, 1, 2))
        torch.testing.assert_close(cls, final[:, -1:])
        early = model.forward_intermediates(x, indices=2, stop_early=True, output_fmt="NLC", intermediates_only=True)
        full = model.forward_intermediates(x, indices=2, output_fmt="NLC", intermediates_only=True)
    assert [t.shape for t in early] == [(2, 16, 64)] * 2
    assert all(torch.equal(a, b) for a, b in zip(early, full))
    kept = model.prune_intermediate_layers(indices=(1,))
    assert kept == [1] and len(model.layers) == 2 and model.num_classes == 0


def test_features_only_matches_forward_intermediates():
    full = timm.create_model("adventurer_tiny_patch16", **SMALL).eval()
    feats = timm.create_model("adventurer_tiny_patch16", features_only=True, out_indices=(1, 2), **SMALL).eval()
    feats.model.load_state_dict(full.state_dict(), strict=False)
    assert feats.feature_info.channels() == [64, 64] and feats.feature_info.reduction() == [8, 8]
    assert len(feats.model.layers) == 3
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = feats(x)
        expected = full.forward_intermediates(x, indices=(1, 2), intermediates_only=True)
    assert [t.shape for t in ours] == [(2, 64, 4, 4)] * 2
    assert all(torch.equal(a, b) for a, b in zip(ours, expected))


def test_grad_checkpointing_same_outputs_and_grads():
    model = small_model(depth=3, drop_path_rate=0.5).train()  # drop path makes the recomputation RNG-sensitive
    x = torch.randn(2, 3, 32, 32)
    results = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        torch.manual_seed(1)
        out = model(x)
        out.square().sum().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_a, out_b)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], msg=name)


def _official_param_groups_lrd(model, weight_decay, no_weight_decay_list, layer_decay):
    """Hand-written official rule (SPEC 6.3): group name -> (lr_scale, weight_decay, parameter names)."""
    num_layers = len(model.layers) + 1
    groups = {}
    for name, param in model.named_parameters():
        no_decay = param.ndim == 1 or name in no_weight_decay_list
        if name in ("cls_token", "pos_embed") or name.startswith(("pos_embed", "patch_embed")):
            layer_id = 0
        elif name.startswith("layers"):
            layer_id = int(name.split(".")[1]) + 1
        else:
            layer_id = num_layers
        key = f"layer_{layer_id}_{'no_decay' if no_decay else 'decay'}"
        group = groups.setdefault(key, (layer_decay ** (num_layers - layer_id), 0.0 if no_decay else weight_decay, []))
        group[2].append(name)
    return groups


def test_layer_decay_groups_equal_official():
    model = small_model()
    names = {id(p): n for n, p in model.named_parameters()}
    ours = param_groups_layer_decay(model, weight_decay=0.05, no_weight_decay_list=model.no_weight_decay(),
                                    layer_decay=0.75)
    official = _official_param_groups_lrd(model, 0.05, model.no_weight_decay(), 0.75)
    assert [(g["weight_decay"], [names[id(p)] for p in g["params"]]) for g in ours] == \
        [(wd, params) for _, wd, params in official.values()]
    for group, (scale, _, _) in zip(ours, official.values()):
        assert group["lr_scale"] == pytest.approx(scale, rel=1e-12)
    head_group = next(g for g in ours if any(p is model.norm_f.weight for p in g["params"]))
    assert head_group["lr_scale"] == 1.0


def test_drop_path_schedule():
    def rates(model):
        return [b.drop_path.drop_prob if isinstance(b.drop_path, DropPath) else 0.0 for b in model.layers]

    assert rates(small_model(drop_path_rate=0.3)) == pytest.approx([0.0, 0.0, 0.1, 0.2])
    assert rates(small_model(drop_path_rate=0.3, official_drop_path=False)) == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_official_initialisation():
    model = small_model(img_size=64, patch_size=16, embed_dim=256, depth=3)
    lecun_std = math.sqrt(1 / (3 * 16 * 16)) / 0.87962566103423978
    assert model.patch_embed.proj.weight.std().item() == pytest.approx(lecun_std, rel=0.03)
    assert model.pos_embed.std().item() == pytest.approx(0.02, rel=0.15)
    assert torch.all(model.head.bias == 0) and torch.all(model.patch_embed.proj.bias == 0)
    for block in model.layers:
        assert all(torch.all(getattr(block.mlp, w).bias == 0) for w in ("w1", "w2", "w3"))
        bound = 1 / math.sqrt(512) / math.sqrt(3)  # kaiming-uniform(a=sqrt 5) over d_inner, / sqrt(depth)
        assert 0.8 * bound < block.mixer.out_proj.weight.abs().max() <= bound
        assert torch.all(block.norm.weight == 1)


def test_unknown_arguments_raise_and_drop_block_rate_is_accepted():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small_model(drop_block_rate=0.1)  # official main.py passes it; it has no effect
    with pytest.raises(TypeError, match="drop_path"):
        small_model(drop_path=0.2)  # timm's contract; the official class swallowed typos silently


def test_timm_device_dtype_and_reset_classifier_follow_the_model():
    model = timm.create_model("adventurer_large_patch16", device="meta", dtype=torch.bfloat16)
    assert {(t.device.type, t.dtype) for t in model.state_dict().values()} == {("meta", torch.bfloat16)}
    model.eval().reset_classifier(7)
    assert (model.head.weight.device.type, model.head.weight.dtype, model.head.training) == ("meta", torch.bfloat16,
                                                                                          False)
