"""Data sets, the three transform recipes, ThreeAugment and the bad-image policy (tiny images, CPU)."""
import argparse
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch._utils import ExceptionWrapper
from torch.utils.data import DataLoader
from torchvision import transforms

from augment import new_data_aug_generator
from datasets import (
    BadImageError,
    DatasetError,
    build_dataset,
    build_finetune_transform,
    build_pretrain_dataset,
    build_pretrain_transform,
    build_transform,
)

BICUBIC = transforms.InterpolationMode.BICUBIC


def make_args(**overrides):
    """Adventurer's defaults for every field the data code reads."""
    args = dict(data_set="FOLDER", data_path="", input_size=32, color_jitter=0.3, aa="rand-m9-mstd0.5-inc1",
                train_interpolation="bicubic", reprob=0.25, remode="pixel", recount=1, eval_crop_ratio=0.875,
                inat_category="name", src=False)
    args.update(overrides)
    return argparse.Namespace(**args)


def write_image(path, color, size=(20, 14)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def make_folder(root, classes=("1", "10", "2"), per_class=2, splits=("train", "val")):
    for split in splits:
        for k, name in enumerate(classes):
            for i in range(per_class):
                write_image(root / split / name / f"{i}.png", (40 * k, 10 * i, 0))
    return root


def explicit(*ops):
    return transforms.Compose([*ops, transforms.ToTensor(), transforms.Normalize(IMAGENET_DEFAULT_MEAN,
                                                                                 IMAGENET_DEFAULT_STD)])


def gradient_image(width, height):
    """A smooth non-square RGB image, so resizes and crops change pixel values measurably."""
    x, y = np.meshgrid(np.linspace(0, 255, width), np.linspace(0, 255, height))
    return Image.fromarray(np.stack([x, y, (x + y) / 2], -1).astype("uint8"))


# ---------------------------------------------------------------- image folders

@pytest.mark.parametrize("data_set,nb_expected", [("FOLDER", 3), ("IMNET", 1000)])
def test_image_folder_lexical_class_order(tmp_path, data_set, nb_expected):
    args = make_args(data_set=data_set, data_path=str(make_folder(tmp_path)))
    train, nb_classes = build_dataset(True, args)
    val, _ = build_dataset(False, args)
    assert nb_classes == nb_expected
    assert train.classes == val.classes == ["1", "10", "2"]  # torchvision order, not natural 1, 2, 10
    assert [target for _, target in val.samples] == [0, 0, 1, 1, 2, 2]
    assert "/10/" in val.samples[2][0]
    image, target = val[2]
    assert image.shape == (3, 32, 32) and target == 1


def test_missing_directories_are_named(tmp_path):
    with pytest.raises(DatasetError, match=f"data directory not found: {tmp_path / 'nope'}"):
        build_dataset(True, make_args(data_path=str(tmp_path / "nope")))
    make_folder(tmp_path, splits=("train",))
    with pytest.raises(DatasetError, match=f"val directory not found: {tmp_path / 'val'}"):
        build_dataset(False, make_args(data_path=str(tmp_path)))
    (tmp_path / "val").mkdir()
    with pytest.raises(DatasetError, match="Couldn't find any class folder"):
        build_dataset(False, make_args(data_path=str(tmp_path)))


def test_val_classes_must_match_train(tmp_path):
    make_folder(tmp_path, classes=("a", "b", "c"), splits=("train",))
    make_folder(tmp_path, classes=("a", "c"), splits=("val",))
    with pytest.raises(DatasetError, match="different class folders.*'b'"):
        build_dataset(False, make_args(data_path=str(tmp_path)))


def test_unknown_data_set_and_missing_cifar(tmp_path):
    with pytest.raises(DatasetError, match="unknown data set 'MNIST'"):
        build_dataset(True, make_args(data_set="MNIST"))
    with pytest.raises(DatasetError, match=str(tmp_path / "cifar-100-python")):
        build_dataset(True, make_args(data_set="CIFAR", data_path=str(tmp_path)))


def test_pretrain_dataset_uses_train_split_and_pretrain_transform(tmp_path):
    make_folder(tmp_path, splits=("train",))  # the official pretraining needs no val split
    dataset = build_pretrain_dataset(make_args(data_path=str(tmp_path), input_size=48))
    assert len(dataset) == 6 and dataset[0][0].shape == (3, 48, 48)
    assert isinstance(dataset.transform.transforms[0], transforms.RandomResizedCrop)


# ---------------------------------------------------------------- DIGITS

def test_digits_split_sizes_labels_disjoint_and_deterministic():
    args = make_args(data_set="DIGITS", input_size=16)
    train, nb_classes = build_dataset(True, args)
    val, _ = build_dataset(False, args)
    assert nb_classes == 10 and (len(train), len(val)) == (1437, 360)
    assert set(train.rows).isdisjoint(val.rows) and len(set(train.rows) | set(val.rows)) == 1797
    assert np.bincount(val.targets).min() >= 35  # stratified: every digit in val
    assert build_dataset(False, args)[0].rows == val.rows
    image, target = val[0]
    assert image.shape == (3, 16, 16) and target == val.targets[0]


def test_digits_pixels_are_rescaled_grayscale_as_rgb():
    from sklearn.datasets import load_digits

    digits = load_digits()
    val, _ = build_dataset(False, make_args(data_set="DIGITS", input_size=8), transform=np.asarray)
    image, target = val[5]
    row = val.rows[5]
    assert target == digits.target[row] and image.shape == (8, 8, 3)
    np.testing.assert_array_equal(image[..., 0], np.round(digits.images[row] * 255 / 16))
    np.testing.assert_array_equal(image[..., 0], image[..., 2])


def test_digits_pretrain_dataset():
    dataset = build_pretrain_dataset(make_args(data_set="DIGITS", input_size=48))
    assert len(dataset) == 1437 and dataset[0][0].shape == (3, 48, 48)


def test_digits_without_sklearn_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(DatasetError, match="pip install scikit-learn"):
        build_dataset(True, make_args(data_set="DIGITS"))


def test_digits_leave_the_seeded_python_stream_alone():
    """scikit-learn's first import draws from Python's random stream; building DIGITS must not show it."""
    code = ("import random, argparse, datasets; random.seed(0); expected = random.random(); random.seed(0); "
            "datasets.build_dataset(True, argparse.Namespace(data_set='DIGITS', input_size=16, data_path='', "
            "bad_images='error'), transform=lambda image: image); print(random.random() == expected)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.stdout.strip() == "True", done.stderr[-2000:]


# ---------------------------------------------------------------- iNaturalist

def make_inat(root, year=2018):
    categories = [{"name": "oak", "genus": "Quercus"}, {"name": "ash", "genus": "Fraxinus"},
                  {"name": "cork", "genus": "Quercus"}]
    def split(entries):
        images = [{"id": i, "file_name": f"train_val{year}/Plantae/{c}/{i}.jpg"} for i, c in enumerate(entries)]
        annotations = [{"image_id": i, "category_id": c} for i, c in enumerate(entries)]
        for i, c in enumerate(entries):  # stored without the supercategory part (DeiT layout)
            write_image(root / f"train_val{year}" / str(c) / f"{i}.jpg", (c * 50, 0, 0))
        return {"images": images, "annotations": annotations}
    (root / "categories.json").write_text(json.dumps(categories))
    (root / f"train{year}.json").write_text(json.dumps(split([2, 0, 2, 1])))
    (root / f"val{year}.json").write_text(json.dumps(split([0, 1, 2])))


@pytest.mark.parametrize("category,nb_expected,train_targets,val_targets",
                         [("name", 3, [0, 1, 0, 2], [1, 2, 0]), ("genus", 2, [0, 0, 0, 1], [0, 1, 0])])
def test_inat_labels_follow_first_appearance_in_train(tmp_path, category, nb_expected, train_targets, val_targets):
    make_inat(tmp_path)
    args = make_args(data_set="INAT", data_path=str(tmp_path), inat_category=category)
    train, nb_classes = build_dataset(True, args)
    val, _ = build_dataset(False, args)
    assert nb_classes == nb_expected and train.targets == train_targets and val.targets == val_targets
    assert val.samples[1][0] == str(tmp_path / "train_val2018" / "1" / "1.jpg")
    assert val[1][0].shape == (3, 32, 32)


def test_inat_errors_name_the_problem(tmp_path):
    make_inat(tmp_path, year=2019)
    with pytest.raises(DatasetError, match="train2018.json"):
        build_dataset(True, make_args(data_set="INAT", data_path=str(tmp_path)))
    with pytest.raises(DatasetError, match="unknown iNat category level 'kingdom'"):
        build_dataset(True, make_args(data_set="INAT19", data_path=str(tmp_path), inat_category="kingdom"))


# ---------------------------------------------------------------- transforms

@pytest.mark.parametrize("size,image_size", [(32, (40, 50)), (224, (300, 200))])
def test_three_recipes_output_shapes(size, image_size):
    args = make_args(input_size=size, color_jitter=None)
    image = gradient_image(*image_size)
    recipes = [build_transform(True, args), build_transform(False, args), build_finetune_transform(True, args),
               build_finetune_transform(False, args), build_pretrain_transform(args), new_data_aug_generator(args)]
    for recipe in recipes:
        assert recipe(image).shape == (3, size, size)


def test_adventurer_train_uses_official_random_crop_up_to_32_px():
    crop = build_transform(True, make_args(input_size=32)).transforms[0]
    assert not isinstance(build_transform(True, make_args(input_size=48)).transforms[0], transforms.RandomCrop)
    image = gradient_image(32, 32)
    torch.manual_seed(3)
    official = transforms.RandomCrop(32, padding=4)(image)
    torch.manual_seed(3)
    assert np.array_equal(np.asarray(crop(image)), np.asarray(official))
    assert crop(gradient_image(20, 14)).size == (32, 32)  # pad_if_needed: tiny images work too


def test_adventurer_eval_matches_official_ops():
    image = gradient_image(300, 200)
    expected = explicit(transforms.Resize(256, BICUBIC), transforms.CenterCrop(224))(image)
    torch.testing.assert_close(build_transform(False, make_args(input_size=224))(image), expected, rtol=0, atol=0)
    small = gradient_image(32, 32)  # official: no resize at <= 32 px; ours is the identity there
    torch.testing.assert_close(build_transform(False, make_args(input_size=32))(small), explicit()(small),
                               rtol=0, atol=0)


def test_finetune_eval_square_resize_keeps_full_field_of_view():
    image = gradient_image(400, 200)
    image.paste((255, 0, 0), (0, 0, 40, 200))  # a red band along the left edge
    square = build_finetune_transform(False, make_args(input_size=224))
    shorter = build_finetune_transform(False, make_args(input_size=224, eval_resize="shorter"))
    torch.testing.assert_close(square(image), explicit(transforms.Resize((256, 256), BICUBIC),
                                                       transforms.CenterCrop(224))(image), rtol=0, atol=0)
    torch.testing.assert_close(shorter(image), explicit(transforms.Resize(256, BICUBIC),
                                                        transforms.CenterCrop(224))(image), rtol=0, atol=0)
    red = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(IMAGENET_DEFAULT_MEAN)) / torch.tensor(IMAGENET_DEFAULT_STD)
    torch.testing.assert_close(square(image)[:, 100, 0], red, atol=0.05, rtol=0)
    assert not torch.allclose(shorter(image)[:, 100, 0], red, atol=0.5)
    big = build_finetune_transform(False, make_args(input_size=256))  # crop_pct 1.0 above 224
    torch.testing.assert_close(big(image), explicit(transforms.Resize((256, 256), BICUBIC))(image), rtol=0, atol=0)


def test_finetune_train_has_no_colour_jitter_unless_given():
    args = make_args(input_size=32, aa="", reprob=0.0)
    del args.color_jitter
    assert not any(isinstance(t, transforms.ColorJitter) for t in build_finetune_transform(True, args).transforms)
    args.color_jitter = 0.4
    assert any(isinstance(t, transforms.ColorJitter) for t in build_finetune_transform(True, args).transforms)


def test_pretrain_transform_is_the_arm_recipe():
    crop = build_pretrain_transform(make_args(input_size=48)).transforms[0]
    assert crop.size == (48, 48) and crop.scale == (0.2, 1.0) and crop.interpolation == BICUBIC


@pytest.mark.parametrize("src", [False, True])
def test_three_augment(src):
    ops = new_data_aug_generator(make_args(input_size=32, src=src, color_jitter=0.0)).transforms
    names = [type(op).__name__ for op in ops]
    assert "AutoAugment" in names and "RandomErasing" not in names and "ColorJitter" not in names
    if src:
        assert names[:2] == ["Resize", "RandomCrop"] and ops[1].padding_mode == "reflect"
    else:
        assert names[0] == "RandomResizedCropAndInterpolation" and ops[0].scale == (0.08, 1.0)
    policy = ops[names.index("AutoAugment")].policy
    assert sorted(sub[0].name for sub in policy) == ["Desaturate", "GaussianBlurRand", "Solarize"]


# ---------------------------------------------------------------- bad images

@pytest.fixture
def folder_with_bad_image(tmp_path):
    make_folder(tmp_path, classes=("a", "b"), per_class=2, splits=("train",))
    bad = tmp_path / "train" / "a" / "1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return tmp_path, bad


def test_bad_image_error_names_the_file(folder_with_bad_image):
    root, bad = folder_with_bad_image
    dataset, _ = build_dataset(True, make_args(data_path=str(root)))
    dataset[0]
    with pytest.raises(BadImageError, match=f"cannot read image {bad} .*UnidentifiedImageError") as info:
        dataset[1]
    assert "\n" not in str(info.value)
    # DataLoader workers re-raise through ExceptionWrapper (traceback glued on); the message stays one
    # line. Done without real workers: their shutdown after an exception takes 5 s (a torch quirk).
    try:
        dataset[1]
    except BadImageError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(BadImageError) as info:
        wrapped.reraise()
    assert str(info.value).startswith(f"cannot read image {bad}") and "\n" not in str(info.value)


def test_bad_images_skip_replaces_warns_once_and_counts(folder_with_bad_image):
    root, bad = folder_with_bad_image
    dataset, _ = build_dataset(True, make_args(data_path=str(root), bad_images="skip"))
    with pytest.warns(RuntimeWarning, match=f"skipping unreadable image {bad}"):
        image, target = dataset[1]
    assert target == 1 and image.shape == (3, 32, 32)  # the next readable sample: b/0.png
    assert dataset.bad_image_count == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known bad files are skipped silently
        assert dataset[1][1] == 1


def test_bad_images_skip_counts_across_workers(folder_with_bad_image):
    root, _ = folder_with_bad_image
    dataset, _ = build_dataset(True, make_args(data_path=str(root), bad_images="skip"))
    batches = list(DataLoader(dataset, batch_size=1, num_workers=2))
    assert len(batches) == 4 and dataset.bad_image_count == 1


def test_bad_images_mode_is_checked(tmp_path):
    make_folder(tmp_path, splits=("train",))
    with pytest.raises(DatasetError, match="bad_images must be one of"):
        build_dataset(True, make_args(data_path=str(tmp_path), bad_images="ignore"))


def test_randaugment_posterize_zero_bits_gives_black_image():
    """Magnitude 10 of PosterizeIncreasing keeps 0 bits: a black image (old Pillow), not a ValueError."""
    from PIL import Image
    from timm.data.auto_augment import AugmentOp  # patched by `augment`, which `datasets` imports (top of file)

    op = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)
    out = op(Image.new("RGB", (8, 8), (200, 100, 50)))
    assert out.getextrema() == ((0, 0), (0, 0), (0, 0))
