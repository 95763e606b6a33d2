"""ThreeAugment (DeiT-III) train transform for Adventurer's `--ThreeAugment` (SPEC 6.7).

timm's `auto_augment="3a"` policy is the same pipeline as the official hand-written one: crop -> hflip ->
exactly one of {solarize (threshold 128), grayscale, Gaussian blur radius U(0.1, 2)} -> ColorJitter ->
ToTensor -> Normalize, no random erasing. It draws the same distribution, but a given seed does not give
the same images as the official code (ECOSYSTEM).
"""
from PIL import Image, ImageOps
from timm.data import auto_augment, create_transform
from torchvision import transforms


def _posterize(img, bits_to_keep, **_):
    """timm's posterize op with Pillow < 13 semantics: keeping 0 bits gives a black image.

    RandAugment's PosterizeIncreasing asks for 0 bits at magnitude 10 (reached by `rand-m9-mstd0.5`),
    which Pillow 13 rejects with a ValueError; older Pillow, which the official runs used, returned black.
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


for _name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
    auto_augment.NAME_TO_OP[_name] = _posterize


def new_data_aug_generator(args):
    """Train transform replacing the RandAugment recipe when `--ThreeAugment` is set.

    `--src` swaps the RandomResizedCrop for Resize(size) + RandomCrop(size, padding 4, reflect): a plain
    shift augmentation without zoom (timm has no such crop mode, so the first op is replaced in place).
    """
    size = args.input_size
    transform = create_transform(
        size, is_training=True, auto_augment="3a", color_jitter=args.color_jitter or None,
        re_prob=0.0, interpolation="bicubic")
    if getattr(args, "src", False):
        transform.transforms[0:1] = [
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.RandomCrop(size, padding=4, padding_mode="reflect"),
        ]
    return transform
