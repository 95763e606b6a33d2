"""Data sets and transforms of the three training scripts (SPEC 6.7, 7.2, 8.2).

Data sets (`args.data_set`):
  IMNET   ImageFolder `<data_path>/train|val`, 1000 classes (torchvision's lexical folder order, the order
          the released heads were trained with).
  FOLDER  the same layout with any number of classes (counted from `train/`).
  CIFAR   torchvision CIFAR-100 from a local copy in `<data_path>` (never downloads).
  INAT, INAT19  iNaturalist 2018 / 2019 from the annotation JSON files (`args.inat_category`).
  DIGITS  embedded default: scikit-learn's bundled 8x8 digits (1,797 real images, 10 classes), fixed
          stratified split of 1,437 train / 360 val images. Each image is scaled to 0..255 and upscaled
          (bicubic, like every resize in these recipes) to `args.input_size` before the transforms, so the
          random crops of all three recipes act on an image of the size they were designed for.

Image files are read through `_CheckedLoading`: with `args.bad_images == "error"` (default) an unreadable
file raises `BadImageError` naming it; with "skip" it is replaced by the next readable sample, warned
about once and counted in `dataset.bad_image_count`. `check_images` (`--check-images`) decodes every file
once at start-up, so a bad file in a folder of a million stops the run before training, not at epoch 200.
"""
import json
import os
import random
import warnings

import torch
from PIL import Image
from timm.data import create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from torchvision import datasets, transforms
from torchvision.datasets.folder import default_loader, find_classes

import augment  # noqa: F401  (makes timm's RandAugment posterize work on Pillow 13)

DATA_SETS = ("IMNET", "FOLDER", "CIFAR", "INAT", "INAT19", "DIGITS")
BAD_IMAGE_MODES = ("error", "skip")
INAT_YEARS = {"INAT": 2018, "INAT19": 2019}
DIGITS_VAL_SIZE = 360
DIGITS_SPLIT_SEED = 0


class DatasetError(RuntimeError):
    """A data set that cannot be used as configured (missing directory or file, bad option)."""


class BadImageError(DatasetError):
    """An image file that cannot be decoded; the message is one line naming the file.

    DataLoader workers re-raise it in the main process with the worker traceback glued to the message;
    the constructor keeps only the original one-line message so entry points can print it as is.
    """

    def __init__(self, message):
        lines = str(message).strip().splitlines()
        if len(lines) > 1:
            message = lines[-1].split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)


def _describe(exc):
    return " ".join(f"{type(exc).__name__}: {exc}".split())


class _CheckedLoading:
    """`__getitem__` for (path, target) sample lists that applies the `bad_images` policy.

    In "skip" mode the unreadable indices live in a shared-memory tensor, so DataLoader workers share
    them: a bad file is warned about once, later visits skip it without reopening it, and
    `bad_image_count` (distinct bad files found so far) is right in the main process too.
    """

    def _read_error(self, i):
        """Why sample i's file cannot be decoded, '' when it can (for check_images)."""
        try:
            self.loader(self.samples[i][0])
        except Exception as exc:  # any decoder failure means the file is unusable
            return _describe(exc)
        return ""

    def _set_bad_image_policy(self, mode):
        if mode not in BAD_IMAGE_MODES:
            raise DatasetError(f"bad_images must be one of {BAD_IMAGE_MODES}, got {mode!r}")
        self.bad_images = mode
        self._bad = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_() if mode == "skip" else None

    @property
    def bad_image_count(self):
        return 0 if self._bad is None else int(self._bad.sum())

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        for offset in range(len(self.samples)):
            i = (index + offset) % len(self.samples)
            if self._bad is not None and self._bad[i]:
                continue
            path, target = self.samples[i]
            try:
                sample = self.loader(path)
            except Exception as exc:  # any decoder failure means the file is unusable
                reason = _describe(exc)
                if self._bad is None:
                    raise BadImageError(f"cannot read image {path} ({reason}); "
                                        "pass --bad-images skip to skip such files") from None
                self._bad[i] = True
                warnings.warn(f"skipping unreadable image {path} ({reason})", RuntimeWarning, stacklevel=2)
                continue
            if self.transform is not None:
                sample = self.transform(sample)
            if self.target_transform is not None:
                target = self.target_transform(target)
            return sample, target
        raise BadImageError(f"no readable image left in {self.root}")


class ImageFolderChecked(_CheckedLoading, datasets.ImageFolder):
    """torchvision ImageFolder (lexical class order) with the bad-image policy."""

    def __init__(self, root, transform=None, bad_images="error"):
        try:
            super().__init__(root, transform=transform)
        except FileNotFoundError as exc:  # no class folders, or class folders without images
            raise DatasetError(f"{root}: {exc}") from None
        self._set_bad_image_policy(bad_images)


class INatDataset(_CheckedLoading, datasets.VisionDataset):
    """iNaturalist 2018/2019 as the official DeiT port reads it (SPEC 6.7).

    Labels: index of the taxonomy level `category` in first-appearance order over the TRAIN annotations
    (so train and val agree). The category id comes from path part 2 of `file_name`, and the image path
    drops part 1 (`<root>/<part0>/<part2>/<part3>`), a DeiT legacy kept for the official layout.
    """

    def __init__(self, root, train=True, year=2018, category="name", transform=None, bad_images="error"):
        super().__init__(root, transform=transform)
        self.loader = default_loader
        train_json = _read_json(os.path.join(root, f"train{year}.json"))
        images = (train_json if train else _read_json(os.path.join(root, f"val{year}.json")))["images"]
        categories = _read_json(os.path.join(root, "categories.json"))
        if category not in categories[0]:
            raise DatasetError(f"unknown iNat category level {category!r}; choose from {sorted(categories[0])}")

        label_of = {}
        for annotation in train_json["annotations"]:
            label_of.setdefault(categories[int(annotation["category_id"])][category], len(label_of))
        self.nb_classes = len(label_of)

        self.samples = []
        for image in images:
            parts = image["file_name"].split("/")
            value = categories[int(parts[2])][category]
            if value not in label_of:
                raise DatasetError(f"{image['file_name']}: {category} {value!r} never occurs in train{year}.json")
            self.samples.append((os.path.join(root, parts[0], parts[2], parts[3]), label_of[value]))
        self.targets = [target for _, target in self.samples]
        self._set_bad_image_policy(bad_images)


class DigitsDataset(Dataset):
    """scikit-learn's 8x8 digits as RGB PIL images upscaled to `image_size` (see the module docstring)."""

    def __init__(self, images, targets, image_size, transform=None, rows=None):
        self.images = images  # uint8 (N, 8, 8), 0..255
        self.rows = rows  # which rows of sklearn's load_digits() these are
        self.targets = [int(t) for t in targets]
        self.image_size = image_size
        self.transform = transform
        self.classes = [str(digit) for digit in range(10)]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        image = Image.fromarray(self.images[index])
        image = image.resize((self.image_size, self.image_size), Image.BICUBIC).convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def _read_json(path):
    if not os.path.isfile(path):
        raise DatasetError(f"annotation file not found: {path}")
    with open(path) as handle:
        return json.load(handle)


def _require_dir(path, what):
    if not os.path.isdir(path):
        raise DatasetError(f"{what} directory not found: {path}")
    return path


def _image_folder(args, is_train, transform):
    """`<data_path>/train|val`; the val split must list exactly the train classes, or labels would shift."""
    data_path = _require_dir(args.data_path, "data")
    root = _require_dir(os.path.join(data_path, "train" if is_train else "val"), "train" if is_train else "val")
    dataset = ImageFolderChecked(root, transform, getattr(args, "bad_images", "error"))
    train_root = os.path.join(data_path, "train")
    if not is_train and os.path.isdir(train_root):
        train_classes = find_classes(train_root)[0]
        if train_classes != dataset.classes:
            missing = sorted(set(train_classes) ^ set(dataset.classes))
            raise DatasetError(f"{root} and {train_root} hold different class folders (e.g. {missing[:5]})")
    return dataset


def _digits(args, is_train, transform):
    # scikit-learn's first import draws from Python's global random stream (through `rich`), which the run
    # has already seeded: keep the stream as it was, so a first and a second run in one process agree.
    stream = random.getstate()
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise DatasetError("the DIGITS data set needs scikit-learn: pip install scikit-learn") from None
    finally:
        random.setstate(stream)
    digits = load_digits()
    train_rows, val_rows = train_test_split(
        range(len(digits.target)), test_size=DIGITS_VAL_SIZE, random_state=DIGITS_SPLIT_SEED,
        stratify=digits.target)
    rows = train_rows if is_train else val_rows
    images = (digits.images[rows] * (255 / 16)).round().astype("uint8")
    return DigitsDataset(images, digits.target[rows], args.input_size, transform, rows=rows)


def _cifar(args, is_train, transform):
    folder = os.path.join(args.data_path, "cifar-100-python")
    _require_dir(folder, "CIFAR-100 (python version, extracted; never downloaded here)")
    try:
        return datasets.CIFAR100(args.data_path, train=is_train, transform=transform, download=False)
    except RuntimeError as exc:
        raise DatasetError(f"{folder}: {exc}") from None


def _build(is_train, args, transform):
    """(dataset, nb_classes) for `args.data_set` with the given transform."""
    name = str(getattr(args, "data_set", "FOLDER")).upper()
    if name in ("IMNET", "FOLDER"):
        dataset = _image_folder(args, is_train, transform)
        nb_classes = len(dataset.classes)
        if name == "IMNET" and nb_classes > 1000:
            raise DatasetError(f"IMNET expects at most 1000 class folders, found {nb_classes}; use FOLDER")
        return dataset, 1000 if name == "IMNET" else nb_classes
    if name == "CIFAR":
        return _cifar(args, is_train, transform), 100
    if name in INAT_YEARS:
        dataset = INatDataset(_require_dir(args.data_path, "iNaturalist"), train=is_train, year=INAT_YEARS[name],
                              category=getattr(args, "inat_category", "name"), transform=transform,
                              bad_images=getattr(args, "bad_images", "error"))
        return dataset, dataset.nb_classes
    if name == "DIGITS":
        return _digits(args, is_train, transform), 10
    raise DatasetError(f"unknown data set {name!r}; choose from {', '.join(DATA_SETS)}")


class _ReadErrors(Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset.samples)

    def __getitem__(self, i):
        return i, self.dataset._read_error(i)


def check_images(named, num_workers=0):
    """Decode every file of the data sets `named` ({"training images": dataset, ...}) once, in `num_workers`
    processes; returns how many are unreadable.

    Under `bad_images="error"` any unreadable file raises BadImageError naming the first ones; under "skip"
    they are marked, so training skips them without opening them again. Data sets without image files
    (DIGITS, CIFAR) have nothing to check.
    """
    total = 0
    for what, dataset in named.items():
        if not isinstance(dataset, _CheckedLoading):
            print(f"--check-images: the {what} are not image files, nothing to check")
            continue
        loader = torch.utils.data.DataLoader(_ReadErrors(dataset), batch_size=64, num_workers=num_workers,
                                             collate_fn=list)
        print(f"--check-images: decoding {len(dataset.samples)} {what} ({num_workers or 'no'} worker processes)")
        bad = [(i, reason) for batch in loader for i, reason in batch if reason]
        if bad and dataset._bad is None:
            first = "; ".join(f"{dataset.samples[i][0]} ({reason})" for i, reason in bad[:3])
            raise BadImageError(f"--check-images: {len(bad)} of {len(dataset.samples)} {what} cannot be read: "
                                f"{first}{'; ...' if len(bad) > 3 else ''}; fix or remove them, or pass "
                                f"--bad-images skip")
        for i, _ in bad:
            dataset._bad[i] = True
        print(f"--check-images: {len(bad)} unreadable {what}" + (" (skipped during training)" if bad else ""))
        total += len(bad)
    return total


def skipped_images(*data_sets):
    """How many unreadable images `--bad-images skip` has skipped so far in these data sets."""
    return sum(getattr(d, "bad_image_count", 0) for d in data_sets)


def build_dataset(is_train, args, transform=None):
    """(dataset, nb_classes); the transform defaults to Adventurer's `build_transform(is_train, args)`.

    Pass `transform` for the ARM recipes (e.g. `build_finetune_transform(is_train, args)`). The dataset's
    `.transform` attribute may also be replaced afterwards (main.py does so for `--ThreeAugment`).
    """
    return _build(is_train, args, build_transform(is_train, args) if transform is None else transform)


def build_pretrain_dataset(args):
    """ARM pretraining images (labels unused): the train split of `args.data_set` with the SPEC 7.2 transform.

    The official script reads `<data_path>/train` as an ImageFolder: `data_set` IMNET (main_pretrain's
    default; at most 1000 classes) or FOLDER (any class count).
    """
    return _build(True, args, build_pretrain_transform(args))[0]


def build_transform(is_train, args):
    """Adventurer recipe (SPEC 6.7).

    Train: timm RandomResizedCrop + hflip + RandAugment (`args.aa`) + RandomErasing; inputs of 32 px or
    less use RandomCrop(size, padding 4) instead of the resized crop (official CIFAR rule; pad_if_needed
    only acts on images still smaller than the crop after padding, where the official code fails).
    Eval: shorter side resized to int(size / eval_crop_ratio), bicubic, centre crop. The official code
    skips resizing for inputs of 32 px or less; here they use crop ratio 1, which is the identity on
    images already at that size (CIFAR, DIGITS) and makes other folders batchable.
    """
    size = args.input_size
    if is_train:
        transform = create_transform(
            size, is_training=True, color_jitter=args.color_jitter, auto_augment=args.aa,
            interpolation=getattr(args, "train_interpolation", "bicubic"),
            re_prob=args.reprob, re_mode=args.remode, re_count=args.recount)
        if size <= 32:
            transform.transforms[0] = transforms.RandomCrop(size, padding=4, pad_if_needed=True)
        return transform
    crop_pct = getattr(args, "eval_crop_ratio", 0.875) if size > 32 else 1.0
    return create_transform(size, is_training=False, crop_pct=crop_pct, interpolation="bicubic")


def build_finetune_transform(is_train, args):
    """ARM finetuning recipe (SPEC 8.2).

    Train: as Adventurer's timm recipe, bicubic, colour jitter only when given (and `--aa` is empty).
    Eval: the official SQUARE resize to int(size / crop_pct) on both sides (aspect ratio not kept; the
    whole image stays in view) then centre crop, crop_pct = 224/256 up to 224 px, else 1.0; reported
    accuracies depend on it. `args.eval_resize == "shorter"` uses the usual shorter-side resize instead.
    """
    size = args.input_size
    if is_train:
        return create_transform(
            size, is_training=True, color_jitter=getattr(args, "color_jitter", None), auto_augment=args.aa,
            interpolation="bicubic", re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
            mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
    resize = getattr(args, "eval_resize", "square")
    if resize not in ("square", "shorter"):
        raise DatasetError(f"eval_resize must be 'square' or 'shorter', got {resize!r}")
    return create_transform(
        size, is_training=False, crop_pct=224 / 256 if size <= 224 else 1.0,
        crop_mode="squash" if resize == "square" else "center", interpolation="bicubic",
        mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)


def build_pretrain_transform(args):
    """ARM pretraining (SPEC 7.2): RandomResizedCrop(scale 0.2-1, bicubic) + hflip, no other augmentation."""
    return transforms.Compose([
        transforms.RandomResizedCrop(args.input_size, scale=(0.2, 1.0),
                                     interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])
