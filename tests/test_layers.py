"""advarm.layers: official names, formulas and initialisers of the shared blocks."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import SwiGLU as TimmSwiGLU
from timm.layers import build_sincos2d_pos_embed, lecun_normal_

from advarm.layers import (
    PatchEmbed,
    SwiGLU,
    drop_path_rates,
    init_weights_official,
    lecun_normal_official_,
    sincos_2d_pos_embed,
    square_img_size,
)


def test_swiglu_keys_and_formula():
    torch.manual_seed(0)
    mlp = SwiGLU(8, 20)
    assert list(mlp.state_dict()) == ["w1.weight", "w1.bias", "w2.weight", "w2.bias", "w3.weight", "w3.bias"]
    x = torch.randn(2, 5, 8)
    expected = F.linear(F.silu(F.linear(x, mlp.w1.weight, mlp.w1.bias)) * F.linear(x, mlp.w2.weight, mlp.w2.bias),
                        mlp.w3.weight, mlp.w3.bias)
    torch.testing.assert_close(mlp(x), expected)


def test_swiglu_equals_timm_after_key_remap():
    """ECOSYSTEM: w1 -> fc1_g (gated), w2 -> fc1_x, w3 -> fc2; the gate must be on w1."""
    torch.manual_seed(0)
    ours = SwiGLU(8, 12)
    timm_mlp = TimmSwiGLU(8, 12, act_layer=nn.SiLU, norm_layer=None)
    rename = {"w1": "fc1_g", "w2": "fc1_x", "w3": "fc2"}
    timm_mlp.load_state_dict({rename[k.split(".")[0]] + "." + k.split(".")[1]: v for k, v in ours.state_dict().items()})
    x = torch.randn(3, 8)
    assert torch.equal(ours(x), timm_mlp(x))


def test_patch_embed_raster_order_and_sizes():
    torch.manual_seed(0)
    embed = PatchEmbed(img_size=32, patch_size=8, in_chans=3, embed_dim=6)
    assert embed.grid_size == 4 and isinstance(embed.grid_size, int)
    assert embed.num_patches == 16
    assert list(embed.state_dict()) == ["proj.weight", "proj.bias"]
    img = torch.randn(2, 3, 32, 32)
    tokens = embed(img)
    assert tokens.shape == (2, 16, 6)
    # token 1*4+2 is the patch at row 1, column 2
    patch = img[:, :, 8:16, 16:24]
    expected = (patch.unsqueeze(1) * embed.proj.weight).sum(dim=(2, 3, 4)) + embed.proj.bias
    torch.testing.assert_close(tokens[:, 6], expected)


def test_patch_embed_rejects_wrong_size():
    embed = PatchEmbed(img_size=32, patch_size=8, in_chans=3, embed_dim=6)
    with pytest.raises(ValueError, match="img_size=48"):
        embed(torch.zeros(1, 3, 48, 48))


def test_square_img_size_accepts_int_or_square_pair_only():
    assert square_img_size(32, "Toy") == 32 and square_img_size((48, 48), "Toy") == 48
    for bad in ((32, 48), (32, 32, 32)):
        with pytest.raises(ValueError, match=r"Toy needs a square input, got img_size=\("):
            square_img_size(bad, "Toy")


def test_drop_path_rates_official_offset():
    rates = drop_path_rates(0.1, 6)
    assert len(rates) == 6
    assert rates[0] == 0.0 and rates[1] == 0.0
    assert rates[2] == pytest.approx(0.02) and rates[-1] == pytest.approx(0.08)  # 0.1 never reached
    plain = drop_path_rates(0.1, 6, official_offset=False)
    assert plain[0] == 0.0 and plain[-1] == pytest.approx(0.1)
    assert drop_path_rates(0.0, 4) == [0.0] * 4


def test_lecun_normal_official_has_absolute_bounds_std():
    """std sqrt(1/768)/0.8796 = 0.0410 for a 16x16x3 conv; current timm lecun_normal_ gives 0.0361."""
    torch.manual_seed(0)
    weight = torch.empty(768, 3, 16, 16)
    lecun_normal_official_(weight)
    expected = math.sqrt(1 / 768) / 0.87962566103423978
    assert weight.std().item() == pytest.approx(expected, rel=5e-3)
    timm_weight = torch.empty(768, 3, 16, 16)
    lecun_normal_(timm_weight)
    assert timm_weight.std().item() < 0.9 * expected


class _ToyMixer(nn.Module):
    def __init__(self):
        super().__init__()
        self.in_proj = nn.Linear(16, 32)
        self.dt_proj = nn.Linear(4, 16)
        self.dt_proj.bias._no_reinit = True
        self.out_proj = nn.Linear(32, 16, bias=False)


class _ToyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.mixer = _ToyMixer()
        self.mlp = nn.Linear(16, 16)


def test_init_weights_official_walk():
    torch.manual_seed(0)
    block = _ToyBlock()
    for p in block.parameters():
        nn.init.constant_(p, 7.0)
    block.apply(lambda m: init_weights_official(m, n_layer=4))
    assert torch.all(block.mixer.in_proj.bias == 0) and torch.all(block.mlp.bias == 0)
    assert torch.all(block.mixer.dt_proj.bias == 7.0)  # flagged _no_reinit
    assert torch.all(block.mixer.in_proj.weight == 7.0)  # Linear weights keep their init
    bound = 1 / math.sqrt(32) / math.sqrt(4)  # kaiming-uniform(a=sqrt 5) bound, then / sqrt(n_layer)
    out = block.mixer.out_proj.weight
    assert out.abs().max() <= bound and out.abs().max() > 0.8 * bound


def test_sincos_2d_pos_embed_mae_order():
    dim, grid = 16, 3
    table = sincos_2d_pos_embed(dim, grid)
    assert table.shape == (9, 16) and table.dtype == torch.float32
    # token 5 = row 1, column 2: first half encodes the column, second half the row
    for half, pos in ((0, 2.0), (1, 1.0)):
        for k in range(dim // 4):
            omega = 10000 ** (-k / (dim / 4))
            assert table[5, half * 8 + k].item() == pytest.approx(math.sin(pos * omega), abs=1e-6)
            assert table[5, half * 8 + 4 + k].item() == pytest.approx(math.cos(pos * omega), abs=1e-6)
    # timm orders the quarters [sin_row, sin_col, cos_row, cos_col]
    timm_table = build_sincos2d_pos_embed([grid, grid], dim)
    q = dim // 4
    reordered = torch.cat([timm_table[:, i * q:(i + 1) * q] for i in (1, 3, 0, 2)], dim=1)
    torch.testing.assert_close(table, reordered, rtol=0, atol=1e-6)
