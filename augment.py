"""ThreeAugment (DeiT-III) train transform for Adventurer's `--ThreeAugment` (SPEC 6.7).

timm's `auto_augment="3a"` policy is the same pipeline as the official hand-written one: crop -> hflip ->
exactly one of {solarize (threshold 128), grayscale, Gaussian blur radius U(0.1, 2)} -> ColorJitter ->
ToTensor -> Normalize, no random erasing. It draws the same distribution, but a given seed does not give
the same images as the official code (ECOSYSTEM).
"""
from torchvision import transforms
from timm.data import create_transform


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
