"""Top-5 classes of images, named with timm's ImageNetInfo when the classifier has an ImageNet head.

    python predict.py cat.jpg dog.png --model adventurer_base_patch16 --checkpoint adventurer_base_patch16_224.pth

Without --checkpoint the released weights are used. The image transform is validate.py's (the pretrained
cfg of the released checkpoint named by the file or by the model at --img-size, else the model's default).
"""
import argparse

import torch
from PIL import Image, UnidentifiedImageError
from timm.data import ImageNetInfo, create_transform, infer_imagenet_subset
from timm.utils import ParseKwargs

import inference
from advarm import checkpoint, kernels, utils


def get_args_parser():
    parser = argparse.ArgumentParser("Top-k ImageNet classes of images")
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    parser.add_argument("--model", "-m", required=True, metavar="NAME", help="timm model name (optionally NAME.TAG)")
    parser.add_argument("--model-kwargs", nargs="*", default={}, type=utils.kwarg_pair, action=ParseKwargs,
                        metavar="KEY=VALUE")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", default="", metavar="PATH", help="checkpoint file or https URL")
    weights.add_argument("--pretrained", action="store_true",
                         help="released weights (the default without --checkpoint)")
    parser.add_argument("--use-ema", action="store_true", help="use the checkpoint's model_ema entry")
    parser.add_argument("--img-size", type=int, default=None, metavar="N", help="input size (default: from the cfg)")
    parser.add_argument("--crop-pct", type=float, default=None, metavar="P", help="centre crop fraction (default: cfg)")
    parser.add_argument("--crop-mode", default=None, choices=["center", "squash", "border"], help="default: cfg")
    parser.add_argument("--interpolation", default=None, metavar="NAME", help="resize interpolation (default: cfg)")
    parser.add_argument("--topk", type=int, default=5, metavar="K")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ssm-backend", default=None, choices=["auto", "torch", "mamba_ssm"],
                        help="SSM kernels (default: $SSM_BACKEND or auto)")
    return parser


def load_image(path):
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:  # missing, unreadable or not an image
        raise SystemExit(f"cannot read image {path} ({type(err).__name__}: {err})") from None


def class_namer(model):
    """index -> 'synset  description' for ImageNet heads (1k, 12k, 21k/22k), else the bare index."""
    subset = infer_imagenet_subset(model)
    if subset is None:
        return lambda index: f"class {index}"
    info = ImageNetInfo(subset)
    return lambda index: f"{info.index_to_label_name(index)}  {info.index_to_description(index)}"


@torch.no_grad()
def predict(args):
    """[(image path, [(probability, index, name), ...])] for every image, best class first."""
    inference.check_model_name(args.model)
    if "img_size" in args.model_kwargs:
        raise SystemExit("--model-kwargs img_size=... is set by --img-size; use that flag")
    if args.ssm_backend:
        kernels.set_backend(args.ssm_backend)
    device = utils.resolve_device(args)
    cfg_name = inference.released_cfg(args.model, args.img_size, args.checkpoint) or args.model
    data_config = inference.eval_data_config(cfg_name, args.img_size, args.crop_pct, args.crop_mode,
                                             args.interpolation)
    model = inference.create_classifier_or_exit(cfg_name, args.checkpoint, pretrained=not args.checkpoint,
                                                use_ema=args.use_ema, img_size=data_config["input_size"][-1],
                                                **args.model_kwargs)
    transform = create_transform(**data_config, is_training=False)
    batch = torch.stack([transform(load_image(path)) for path in args.images]).to(device)
    probabilities = model.to(device)(batch).float().softmax(dim=-1)
    top = probabilities.topk(min(args.topk, probabilities.shape[-1]), dim=-1)
    name = class_namer(model)
    return [(path, [(p.item(), i.item(), name(i.item())) for p, i in zip(values, indices)])
            for path, values, indices in zip(args.images, top.values, top.indices)]


def main(args):
    try:
        results = predict(args)
    except (checkpoint.CheckpointError, kernels.BackendUnavailableError) as err:
        raise SystemExit(f"error: {err}") from None
    for path, classes in results:
        print(path)
        for rank, (probability, index, name) in enumerate(classes, start=1):
            print(f"  {rank}. {100 * probability:6.2f}%  {index:>5d}  {name}")
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
