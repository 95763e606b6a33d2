"""Other input sizes for both classifier families: `dynamic_img_size=True` and `set_input_size()` (timm's ViT API).

The reference for both is a model BUILT at the other size from weights resized by the family's checkpoint
filter, so the resampled position table (class token last for Adventurer, at N // 2 for ARM) must be the one
the filter writes. Tiny widths at the real 224 -> 256 / 320 grids (14 -> 16 / 20 patches).
"""
import pytest
import timm
import torch
from timm.layers import resample_patch_embed
from timm.models import get_model_input_config

import models_adventurer
import models_arm

FAMILIES = {
    "adventurer_tiny_patch16": models_adventurer.checkpoint_filter_fn,
    "arm_base_pz16": models_arm.checkpoint_filter_fn,
}
TINY = dict(depth=2, embed_dim=32, num_classes=5)


pytestmark = pytest.mark.usefixtures("one_thread")


def build(name, size, **kwargs):
    return timm.create_model(name, img_size=size, **TINY, **kwargs).eval()


@pytest.mark.parametrize("name", FAMILIES)
def test_built_at_224_runs_at_256_and_320_like_models_built_there(name):
    torch.manual_seed(0)
    dynamic = build(name, 224, dynamic_img_size=True)
    for size in (256, 320):
        reference = build(name, size)
        reference.load_state_dict(FAMILIES[name](dynamic.state_dict(), reference))
        resized = build(name, 224)
        resized.load_state_dict(dynamic.state_dict())
        resized.set_input_size(img_size=size)
        assert all(torch.equal(v, reference.state_dict()[k]) for k, v in resized.state_dict().items())
        assert resized.pos_embed.shape == reference.pos_embed.shape and resized.cls_index == reference.cls_index
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            expected = reference(x)
            torch.testing.assert_close(dynamic(x), expected)
            torch.testing.assert_close(resized(x), expected)
            maps = dynamic.forward_intermediates(x, indices=1, intermediates_only=True)
        assert maps[0].shape == (2, 32, size // 16, size // 16)
    with torch.no_grad():  # the built size still runs on the unchanged table
        assert dynamic(torch.randn(1, 3, 224, 224)).shape == (1, 5)
    assert dynamic.pos_embed.shape[1] == 197


@pytest.mark.parametrize("name", FAMILIES)
def test_timm_sees_fixed_or_dynamic_input_size(name):
    assert get_model_input_config(build(name, 64))["fixed_input_size"] is True
    assert get_model_input_config(build(name, 64, dynamic_img_size=True))["fixed_input_size"] is False


def test_static_model_names_the_ways_to_another_size():
    model = build("adventurer_tiny_patch16", 64)
    with pytest.raises(ValueError, match="img_size=80 .*dynamic_img_size=True, or call set_input_size"):
        model(torch.randn(1, 3, 80, 80))
    model.set_input_size(img_size=(80, 80))
    assert model(torch.randn(1, 3, 80, 80)).shape == (1, 5)


def test_set_input_size_resamples_the_patch_kernel_and_keeps_frozen_tables():
    torch.manual_seed(0)
    model = build("adventurer_tiny_patch16", 64)
    model.pos_embed.requires_grad_(False)
    kernel = model.patch_embed.proj.weight.detach().clone()
    model.set_input_size(patch_size=8)
    assert torch.equal(model.patch_embed.proj.weight, resample_patch_embed(kernel, [8, 8]))
    assert model.patch_embed.grid_size == 8 and model.pos_embed.shape == (1, 65, 32)
    assert not model.pos_embed.requires_grad and model.feature_info[0]["reduction"] == 8
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)


def test_adventurer_dynamic_runs_rectangles_and_arm_needs_a_square_grid():
    torch.manual_seed(0)
    adventurer = build("adventurer_tiny_patch16", 64, dynamic_img_size=True)
    with torch.no_grad():
        maps = adventurer.forward_intermediates(torch.randn(1, 3, 64, 96), indices=1, intermediates_only=True)
    assert maps[0].shape == (1, 32, 4, 6)
    arm = build("arm_base_pz16", 64, dynamic_img_size=True)
    with pytest.raises(ValueError, match="ARM needs a square patch grid .* 4x6 grid from a 64x96 input"):
        arm(torch.randn(1, 3, 64, 96))


def test_arm_set_input_size_to_an_odd_grid_warns_like_building_there():
    model = build("arm_base_pz16", 64)
    with pytest.warns(UserWarning, match="odd patch count"):
        model.set_input_size(img_size=48)
    assert model.cls_index == 4 and model.pos_embed.shape == (1, 10, 32)
