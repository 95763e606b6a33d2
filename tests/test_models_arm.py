"""ARM models: official golden outputs, key layouts, the pretrain -> finetune transfer and the timm interface.

Everything runs on CPU in fp32 with tiny models; the full-size models are only built on the meta device.
"""
import argparse
import re

import pytest
import timm
import torch
from conftest import golden_cases
from timm.optim import param_groups_layer_decay

import models_arm
from models_arm import (
    ARM,
    MODEL_CONFIGS,
    VisionMamba,
    block_causal_mask,
    checkpoint_filter_fn,
    create_finetune_model,
    create_pretrain_model,
    default_tap_layers,
    pretrain_to_finetune,
    to_clusters,
)

TINY = dict(patch_size=16, embed_dim=64, depth=4)  # finetune: img 64 -> 4x4 grid, cls at 8


def tiny_pretrain(**kwargs):
    """128 px / patch 16 -> 8x8 grid, 2x2 clusters, 48 encoder tokens."""
    return VisionMamba(**{**dict(img_size=128, dec_embed_dim=64), **TINY, **kwargs})


def tiny_finetune(**kwargs):
    return ARM(**{**dict(img_size=64, num_classes=10), **TINY, **kwargs})


def meta_build(factory, *args, **kwargs):
    """Build on the meta device: full-size layouts without memory or init cost."""
    with torch.device("meta"):
        return factory(*args, **kwargs)


# ----------------------------------------------------------------------------------------------- golden

@pytest.mark.parametrize("name", golden_cases("arm_pretrain") + golden_cases("arm_finetune"))
def test_golden_fixture(golden, name):
    fixture = golden(name)
    cls = VisionMamba if fixture["family"] == "arm_pretrain" else ARM
    model = cls(**fixture["kwargs"]).eval()
    model.load_state_dict(fixture["state_dict"], strict=True)
    assert list(model.state_dict()) == list(fixture["state_dict"])
    with torch.no_grad():
        out = model(fixture["input"])
    assert out.shape == fixture["output"].shape
    torch.testing.assert_close(out, fixture["output"], rtol=1e-4, atol=1e-4)


def test_block_mlp_matches_swiglu_in_values_and_gradients():
    """The Block's memory-lean SwiGLU (`_GatedProjection`) against the plain module, fp32 and bf16 autocast."""
    torch.manual_seed(0)
    block = models_arm.Block(32, "None")
    x = torch.randn(2, 9, 32)
    for dtype in (None, torch.bfloat16):
        results = []
        for lean in (True, False):
            params = [p for p in block.mlp.parameters()]
            inp = x.clone().requires_grad_()
            with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                h = block.norm2(inp)
                out = (models_arm._GatedProjection.apply(block.mlp.w1(h), block.mlp.w2(h), block.mlp.w3.weight,
                                                         block.mlp.w3.bias) if lean else block.mlp(h))
            grads = torch.autograd.grad((out.float() * torch.linspace(-1, 1, 32)).sum(), [inp, *params])
            results.append((out, grads))
        (out, grads), (ref, ref_grads) = results
        assert out.dtype == ref.dtype and (dtype is None or out.dtype == dtype)
        tol = 1e-6 if dtype is None else 2e-2
        torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
        for g, g_ref in zip(grads, ref_grads):
            assert g.dtype == g_ref.dtype
            torch.testing.assert_close(g, g_ref, rtol=tol, atol=tol * g_ref.abs().max().item())


# ------------------------------------------------------------------------------------ keys and counts

def _rows(keys_table, family, variant):
    rows = [r for r in keys_table if r["family"] == family and r["model_variant"] == variant]
    assert rows, f"no rows for {family} {variant}"
    return [(r["key"], r["shape"]) for r in sorted(rows, key=lambda r: int(r["index"]))]


def _layout(model):
    return [(k, "x".join(map(str, v.shape))) for k, v in model.state_dict().items()]


# name -> (parameters, trainable) of KEYS.md / SPEC 3.1
PRETRAIN_COUNTS = {
    "arm_base_pz16": (99_427_328, 99_243_008),
    "arm_large_pz16": (303_942_880, 303_721_696),
    "arm_huge_pz16": (659_422_976, 659_128_064),
}
# (name, img) -> parameters of KEYS.md / SPEC 4.1
FINETUNE_COUNTS = {
    ("arm_base_pz16", 224): 85_031_656,
    ("arm_base_pz16", 384): 85_323_496,
    ("arm_large_pz16", 224): 297_035_720,
    ("arm_huge_pz16", 224): 662_682_088,
}


@pytest.mark.parametrize("name", sorted(PRETRAIN_COUNTS))
def test_pretrain_keys_and_params(keys_table, name):
    model = meta_build(create_pretrain_model, name)
    assert _layout(model) == _rows(keys_table, "arm_pt", name)
    total, trainable = PRETRAIN_COUNTS[name]
    assert sum(p.numel() for p in model.parameters()) == total
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable
    assert not model.pos_embed.requires_grad and not model.dec_pos_embed.requires_grad
    assert "mask" in model.state_dict() and model.mask.dtype == torch.float32


@pytest.mark.parametrize("name,img", sorted(FINETUNE_COUNTS))
def test_finetune_keys_and_params(keys_table, name, img):
    model = meta_build(create_finetune_model, name, img_size=img)
    assert _layout(model) == _rows(keys_table, "arm_ft", f"{name}@{img}")
    assert sum(p.numel() for p in model.parameters()) == FINETUNE_COUNTS[(name, img)]


def test_create_unknown_name_lists_valid_names():
    for factory in (create_pretrain_model, create_finetune_model):
        with pytest.raises(ValueError, match="arm_base_pz16, arm_large_pz16, arm_huge_pz16"):
            factory("arm_tiny_pz16")


def test_unknown_kwarg_is_rejected_but_official_flags_are_accepted():
    tiny_finetune(rms_norm=True, fused_add_norm=True, residual_in_fp32=True, if_devide_out=True, if_rope=False)
    with pytest.raises(TypeError, match="globl_pool"):
        tiny_finetune(globl_pool=True)
    with pytest.raises(ValueError, match="use_double_cls_token=False"):
        tiny_finetune(use_double_cls_token=True)


# ----------------------------------------------------------------------------------- pretraining model

def test_cluster_order_and_mask():
    ids = torch.arange(144).reshape(1, 144, 1)
    clusters = to_clusters(ids, 12, 4)[0, :, :, 0]
    assert clusters.shape == (9, 16)
    assert clusters[0, :5].tolist() == [0, 1, 2, 3, 12]  # inside a cluster: raster over 4x4
    assert clusters[1, 0] == 4 and clusters[3, 0] == 48 and clusters[8, -1] == 143
    mask = block_causal_mask(8, 16)
    i, j = torch.meshgrid(torch.arange(128), torch.arange(128), indexing="ij")
    assert torch.equal(mask == 0, j // 16 <= i // 16)
    assert torch.isinf(mask[j // 16 > i // 16]).all()


def test_default_tap_layers():
    assert default_tap_layers(12) == (6, 8, 10, 12)
    assert default_tap_layers(24) == (12, 16, 20, 24)
    assert default_tap_layers(4) == (1, 2, 3, 4)
    with pytest.raises(ValueError, match="depth >= 4"):
        default_tap_layers(3)


def test_generalised_geometry_loss_is_finite_and_differentiable():
    torch.manual_seed(0)
    model = VisionMamba(img_size=48, patch_size=4, stride=4, depth=4, embed_dim=16, dec_embed_dim=16)
    assert model.tap_layers == (1, 2, 3, 4)
    assert model.ar_pred.out_features == 4 * 4 * 3 and model.mask.shape == (128, 128)
    loss = model(torch.randn(2, 3, 48, 48))
    assert loss.shape == (128,) and torch.isfinite(loss).all()
    loss.mean().backward()
    assert model.layers[0].mixer.in_proj.weight.grad.abs().sum() > 0
    assert model.pos_embed.grad is None  # frozen table


def test_pretrain_grad_checkpointing_keeps_loss():
    torch.manual_seed(0)
    model = tiny_pretrain(depth=4, embed_dim=16, dec_embed_dim=16).eval()
    imgs = torch.randn(1, 3, 128, 128)
    plain = model(imgs)
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(model(imgs), plain)


def test_geometry_errors_are_clear():
    with pytest.raises(ValueError, match="not divisible by cluster_size"):
        VisionMamba(img_size=80, patch_size=16, depth=4, embed_dim=32, dec_embed_dim=32)
    with pytest.raises(ValueError, match="stride"):
        VisionMamba(img_size=128, patch_size=16, stride=8, depth=4, embed_dim=32, dec_embed_dim=32)


def test_targets_use_unbiased_variance():
    """Zero predictions: the loss is the mean squared normalised target, (n-1)/n with the unbiased variance."""
    model = tiny_pretrain()
    imgs = torch.randn(2, 3, 128, 128)
    pred = torch.zeros(2, model.num_steps, 16 * 16 * 3)
    n = 16 * 16 * 3
    torch.testing.assert_close(model.forward_loss(imgs, pred).mean(-1),
                               torch.full((2, model.num_steps), (n - 1) / n), rtol=1e-4, atol=1e-4)


def test_norm_pix_switch():
    torch.manual_seed(0)
    official = tiny_pretrain(norm_pix_loss=False).eval()
    raw = tiny_pretrain(norm_pix_loss=False, official_norm_pix=False).eval()
    raw.load_state_dict(official.state_dict())
    imgs = 3 * torch.randn(1, 3, 128, 128) + 1
    with torch.no_grad():
        normalised = tiny_pretrain().eval()
        normalised.load_state_dict(official.state_dict())
        assert torch.equal(official(imgs), normalised(imgs))  # official ignores norm_pix_loss
        assert not torch.allclose(official(imgs), raw(imgs))


# --------------------------------------------------------------------------------------------- transfer

def test_pretrain_to_finetune_fills_every_mapped_key():
    torch.manual_seed(0)
    source = tiny_pretrain().state_dict()
    model = ARM(img_size=96, num_classes=10, **TINY)  # 8x8 pretraining grid -> 6x6, cls at 18
    out = pretrain_to_finetune(source, model)
    expected = model.state_dict()
    assert set(out) == set(expected) - {"cls_token", "head.weight", "head.bias", "norm_f.weight", "norm_f.bias"}
    assert not any(re.match(r"(mask|ar_token|dec_pos_embed|enc2dec|dec_block|norm_\d|ar_norm|ar_pred)", k)
                   for k in out)
    for i in range(TINY["depth"]):
        mixer = f"layers.{i}.mixer."
        for suffix in ("_b", "_c", "_c_b"):
            assert torch.equal(out[f"{mixer}A{suffix}_log"], source[f"{mixer}A_log"])
            assert torch.equal(out[f"{mixer}D{suffix}"], source[f"{mixer}D"])
            for name in ("conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias"):
                module, param = name.split(".")
                assert torch.equal(out[f"{mixer}{module}{suffix}.{param}"], source[mixer + name])
        for shared in ("in_proj.weight", "out_proj.weight"):
            assert torch.equal(out[mixer + shared], source[mixer + shared])
    assert out["pos_embed"].shape == (1, 37, 64)
    assert torch.equal(out["pos_embed"][0, 18], torch.zeros(64))
    missing, unexpected = model.load_state_dict(out, strict=False)
    assert sorted(missing) == ["cls_token", "head.bias", "head.weight", "norm_f.bias", "norm_f.weight"]
    assert unexpected == []


def test_pretrain_to_finetune_same_grid_keeps_table():
    source = tiny_pretrain().state_dict()
    out = pretrain_to_finetune(source, ARM(img_size=128, num_classes=10, **TINY))
    table = source["pos_embed"]
    assert torch.equal(out["pos_embed"], torch.cat([table[:, :32], torch.zeros(1, 1, 64), table[:, 32:]], 1))


def test_finetuned_checkpoint_at_new_resolution_keeps_cls_slot():
    source = tiny_finetune().state_dict()
    model = tiny_finetune(img_size=96)
    out = checkpoint_filter_fn({"model": source}, model)
    assert out["pos_embed"].shape == model.pos_embed.shape
    assert torch.equal(out["pos_embed"][0, 18], source["pos_embed"][0, 8])
    model.load_state_dict(out, strict=True)


def test_convert_cli(tmp_path, monkeypatch):
    monkeypatch.setitem(MODEL_CONFIGS, "arm_test_pz16", dict(TINY))
    torch.manual_seed(0)
    pretrained = tiny_pretrain()
    src, dst = tmp_path / "checkpoint-1599.pth", tmp_path / "finetune_init.pth"
    torch.save({"model": pretrained.state_dict(), "epoch": 1599, "args": argparse.Namespace(blr=1.5e-4)}, src)
    models_arm.main(["convert", str(src), str(dst), "--model", "arm_test_pz16", "--input-size", "64",
                     "--nb-classes", "10"])
    state_dict = torch.load(dst, weights_only=True)["model"]
    model = create_finetune_model("arm_test_pz16", img_size=64, num_classes=10)
    model.load_state_dict(state_dict, strict=True)
    assert torch.equal(model.layers[1].mixer.dt_proj_c_b.bias, pretrained.layers[1].mixer.dt_proj.bias)
    assert model.head.weight.std() < 1e-4  # official 2e-5 head re-init
    with pytest.raises(SystemExit, match="not an ARM pretraining checkpoint"):
        models_arm.main(["convert", str(dst), str(tmp_path / "again.pth"), "--model", "arm_test_pz16",
                         "--input-size", "64"])


# -------------------------------------------------------------------------------------- timm interface

def _timm_tiny(**kwargs):
    return timm.create_model("arm_base_pz16", img_size=64, **{**TINY, **kwargs})


def test_timm_offline_load_of_official_containers(tmp_path):
    torch.manual_seed(0)
    source = _timm_tiny(num_classes=1000).eval()
    path = tmp_path / "arm_finetuned.pth"
    state_dict = {f"module.{k}": v for k, v in source.state_dict().items()}
    torch.save({"model_ema": state_dict, "epoch": 99, "args": argparse.Namespace(lr=2e-3)}, path)
    loaded = _timm_tiny(pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in source.state_dict().items())
    assert loaded.pretrained_cfg["crop_pct"] == 0.875 and loaded.pretrained_cfg["hf_hub_id"] == "OliverRen/ARM"


def test_timm_offline_load_of_pretraining_checkpoint(tmp_path):
    torch.manual_seed(0)
    pretrained = tiny_pretrain()
    path = tmp_path / "checkpoint-1599.pth"
    torch.save({"model": pretrained.state_dict(), "args": argparse.Namespace(norm_pix_loss=True)}, path)
    model = _timm_tiny(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(model.layers[3].mixer.A_c_log, pretrained.layers[3].mixer.A_log)
    assert torch.equal(model.patch_embed.proj.weight, pretrained.patch_embed.proj.weight)
    assert model.head.weight.std() < 1e-4 and model.pos_embed.shape == (1, 17, 64)


def test_forward_head_pooling_and_reset_classifier():
    torch.manual_seed(0)
    model = tiny_finetune(global_pool=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape == (2, 17, 64)
        pooled = model.forward_head(tokens, pre_logits=True)
        torch.testing.assert_close(pooled, tokens[:, torch.arange(17) != 8].mean(1))  # even N: plain patch mean
        torch.testing.assert_close(model(x), model.head(pooled))
        model.reset_classifier(5, global_pool="token")
        assert model(x).shape == (2, 5)
        torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), tokens[:, 8])
        model.reset_classifier(0)
        assert model(x).shape == (2, 64) and model.num_features == model.head_hidden_size == 64
        model.reset_classifier(0, global_pool="")
        torch.testing.assert_close(model(x), tokens)  # timm's '' keeps the token sequence
    assert model.no_weight_decay() == {"pos_embed", "cls_token", "dist_token", "cls_token_head", "cls_token_tail"}


def _official_layer_id(name, num_layers):
    """The official ARM `get_layer_id_for_vit` rule (SPEC 8.2)."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("layers"):
        return int(name.split(".")[1]) + 1
    return num_layers


def test_timm_device_dtype_and_reset_classifier_follow_the_model():
    model = timm.create_model("arm_huge_pz16", device="meta", dtype=torch.bfloat16)
    assert {(t.device.type, t.dtype) for t in model.state_dict().values()} == {("meta", torch.bfloat16)}
    assert model.in_chans == model.pretrained_cfg["input_size"][0] == 3
    model.eval().reset_classifier(7)
    assert (model.head.weight.device.type, model.head.weight.dtype, model.head.training) == ("meta", torch.bfloat16,
                                                                                          False)
    with pytest.raises(ValueError, match="'avg', 'token' or ''"):
        model.reset_classifier(7, global_pool="max")


def test_timm_layer_decay_matches_official_groups():
    model = tiny_finetune()
    groups = param_groups_layer_decay(model, weight_decay=0.05, no_weight_decay_list=model.no_weight_decay(),
                                      layer_decay=0.65)
    ours = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    num_layers = len(model.layers) + 1
    for name, param in model.named_parameters():
        layer_id = _official_layer_id(name, num_layers)
        decay = 0.0 if param.ndim == 1 or name in model.no_weight_decay() else 0.05
        assert ours[id(param)] == pytest.approx((0.65 ** (num_layers - layer_id), decay)), name


def test_grad_checkpointing_keeps_outputs():
    torch.manual_seed(0)
    model = tiny_finetune(depth=2, embed_dim=32).eval()
    x = torch.randn(1, 3, 64, 64)
    plain = model(x)
    model.set_grad_checkpointing(True)
    checkpointed = model(x)
    torch.testing.assert_close(checkpointed, plain)
    checkpointed.sum().backward()
    assert model.layers[0].mixer.in_proj.weight.grad is not None


def test_forward_intermediates_and_prune():
    torch.manual_seed(0)
    model = tiny_finetune().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x, indices=[1, 3], norm=True)
        tokens = model.forward_features(x)
        assert [m.shape for m in maps] == [(2, 64, 4, 4)] * 2
        torch.testing.assert_close(final, tokens)
        patches = torch.cat([tokens[:, :8], tokens[:, 9:]], 1)  # the cls token sits in the middle
        torch.testing.assert_close(maps[1].flatten(2).transpose(1, 2), patches)
        pairs = model.forward_intermediates(x, indices=1, norm=True, output_fmt="NLC", return_prefix_tokens=True,
                                            intermediates_only=True)
        torch.testing.assert_close(pairs[0][1], tokens[:, 8:9])
        assert model.prune_intermediate_layers(indices=[1]) == [1]
    assert len(model.layers) == 2 and isinstance(model.head, torch.nn.Identity)


def test_features_only():
    model = _timm_tiny(features_only=True, out_indices=(1, 3)).eval()
    with torch.no_grad():
        features = model(torch.randn(1, 3, 64, 64))
    assert [f.shape for f in features] == [(1, 64, 4, 4)] * 2
    assert model.feature_info.channels() == [64, 64] and model.feature_info.reduction() == [16, 16]


def test_odd_patch_count_warns():
    with pytest.warns(UserWarning, match="odd patch count"):
        ARM(img_size=48, num_classes=10, **TINY)


def test_prune_head_removes_pooling_like_timm():
    model = models_arm.create_finetune_model("arm_base_pz16", patch_size=16, depth=2, embed_dim=32,
                                             img_size=64, num_classes=5)
    model.prune_intermediate_layers(indices=1, prune_head=True)
    assert model.num_classes == 0
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 17, 32)  # the token sequence, not a pooled vector
