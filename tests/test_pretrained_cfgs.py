"""Pretrained cfgs of both families: timm's data config and transform equal the official eval transform.

Every cfg goes through `timm.data.resolve_data_config` and `create_transform` and is compared, on
non-square images, with the official eval transform written out from the SPEC: Adventurer (6.7, 10.1)
resizes the shorter side to int(size / ratio) with ratio 0.875 for the patch-16 224 files and 1.0 for
the others; ARM finetuning (8.2) squashes both sides to int(size / crop_pct), crop_pct 224/256 up to
224 px, else 1.0. Then the ARM pooling and `pretrained=True` behaviour.
"""
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform, resolve_data_config
from timm.models import get_pretrained_cfg
from torchvision import transforms

import advarm  # noqa: F401  (registers every model with timm)
import models_arm

BICUBIC = transforms.InterpolationMode.BICUBIC
ADVENTURER_CFGS = timm.list_pretrained("adventurer*")
ARM_CFGS = timm.list_pretrained("arm*")


def official_adventurer_eval(size, file):
    ratio = 0.875 if file.endswith("patch16_224.pth") else 1.0  # SPEC 10.1
    return transforms.Compose([transforms.Resize(int(size / ratio), interpolation=BICUBIC),
                               transforms.CenterCrop(size), transforms.ToTensor(),
                               transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])


def official_arm_eval(size):
    crop_pct = 224 / 256 if size <= 224 else 1.0  # SPEC 8.2
    return transforms.Compose([transforms.Resize((int(size / crop_pct), int(size / crop_pct)), interpolation=BICUBIC),
                               transforms.CenterCrop(size), transforms.ToTensor(),
                               transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)) for shape in ((300, 500, 3),
                                                                                           (520, 310, 3))]


def timm_eval(name):
    config = resolve_data_config(pretrained_cfg=get_pretrained_cfg(name).to_dict())
    return config, create_transform(**config, is_training=False)


def test_every_released_file_has_cfgs():
    assert len(ADVENTURER_CFGS) == 16 and len({get_pretrained_cfg(n).hf_hub_filename for n in ADVENTURER_CFGS}) == 8
    assert sorted(ARM_CFGS) == ["arm_base_pz16.in1k", "arm_huge_pz16.in1k", "arm_huge_pz16.in1k_384",
                                "arm_large_pz16.in1k"]


@pytest.mark.parametrize("name", ADVENTURER_CFGS + ARM_CFGS)
def test_timm_transform_of_every_cfg_is_the_official_eval_transform(name, images):
    config, transform = timm_eval(name)
    size = config["input_size"][-1]
    if name.startswith("arm"):
        official = official_arm_eval(size)
        assert (config["crop_mode"], config["interpolation"]) == ("squash", "bicubic")
    else:
        official = official_adventurer_eval(size, get_pretrained_cfg(name).hf_hub_filename)
        assert (config["crop_mode"], config["interpolation"]) == ("center", "bicubic")
    for image in images:
        ours, theirs = transform(image), official(image)
        assert ours.shape == (3, size, size)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_squash_and_shorter_side_differ_on_these_images(images):
    """The comparison above can tell the two resize rules apart."""
    _, squash = timm_eval("arm_base_pz16.in1k")
    assert not torch.equal(squash(images[0]), official_adventurer_eval(224, "x_patch16_224.pth")(images[0]))


@pytest.mark.parametrize("name, size", [("arm_base_pz16", 224), ("arm_large_pz16.in1k", 224),
                                        ("arm_huge_pz16", 224), ("arm_huge_pz16.in1k_384", 384)])
def test_arm_cfgs_build_the_released_head(name, size):
    model = timm.create_model(name, device="meta")
    assert model.global_pool == "avg"  # the README finetunes with --global_pool True
    assert model.patch_embed.img_size == size and model.pos_embed.shape[1] == (size // 16) ** 2 + 1
    assert timm.create_model(name, device="meta", global_pool="token").global_pool == "token"


def test_arm_pretrained_without_a_file_says_where_the_weights_are(tmp_path):
    with pytest.raises(ValueError, match="huggingface.co/OliverRen/ARM.*pretrained_cfg_overlay=dict"):
        timm.create_model("arm_base_pz16", pretrained=True, device="meta")
    torch.manual_seed(0)
    kwargs = dict(img_size=64, patch_size=16, depth=2, embed_dim=32)
    source = models_arm.ARM(global_pool=True, **kwargs)
    path = tmp_path / "arm_base.pth"
    torch.save({"model": source.state_dict()}, path)
    model = timm.create_model("arm_base_pz16", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    assert model.global_pool == "avg" and torch.equal(model.head.weight, source.head.weight)


def test_adventurer_cfgs_keep_token_pooling():
    assert timm.create_model("adventurer_base_patch16.in1k_384", device="meta").patch_embed.img_size == 384
    assert timm.create_model("adventurer_base_patch8_448", device="meta").global_pool == "token"
