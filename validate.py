"""Evaluate classifiers on a labelled image set in the style of timm's validate.py: one result row per model.

    python validate.py --model adventurer_base_patch16 --checkpoint adventurer_base_patch16_384.pth \
        --data-dir /PATH/TO/IMAGENET --results-file results.csv

Several --model and/or --checkpoint values give one row each: one model with several checkpoints, several
models with one checkpoint or with none (released weights), or pairs in order. Image size, crop and
interpolation come from the pretrained cfg of the released checkpoint that the file name, or the model name
at --img-size, refers to, else from the model's default cfg; the flags override them. Evaluation is main.py's
(`engine.evaluate`, the same data sets and timm transform), so a row equals main.py's `--eval` on the same
checkpoint, crop and precision; main.py autocasts to bfloat16 by default, validate.py runs float32 unless
--amp says otherwise. Rows are printed as JSON at the end and written to --results-file as CSV.
"""
import argparse
import csv
import json
import time
from pathlib import Path

import torch
from timm.data import create_transform
from timm.models import get_pretrained_cfg
from timm.utils import ParseKwargs

import datasets
import inference
from advarm import checkpoint, kernels, utils
from engine import evaluate


def get_args_parser():
    parser = argparse.ArgumentParser("Evaluate classifiers on a labelled image set (timm validate.py style)")
    parser.add_argument("--model", "-m", nargs="+", required=True, metavar="NAME",
                        help="timm model names (optionally NAME.TAG); one row per model and/or checkpoint")
    parser.add_argument("--model-kwargs", nargs="*", default={}, type=utils.kwarg_pair, action=ParseKwargs,
                        metavar="KEY=VALUE",
                        help="extra model constructor arguments, e.g. depth=2 embed_dim=64")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", nargs="+", default=[], metavar="PATH",
                         help="checkpoint files or https URLs (state dict or training container, .pth/.safetensors)")
    weights.add_argument("--pretrained", action="store_true",
                         help="released weights (the default without --checkpoint)")
    parser.add_argument("--use-ema", action="store_true", help="evaluate the checkpoint's model_ema entry")

    parser.add_argument("--data-dir", "--data-path", dest="data_dir", required=True, metavar="DIR",
                        help="data set root (IMNET/FOLDER: the folder holding val/)")
    parser.add_argument("--data-set", default="IMNET", choices=list(datasets.DATA_SETS))
    parser.add_argument("--inat-category", default="name", help="taxonomy level of INAT/INAT19 labels")
    parser.add_argument("--bad-images", default="error", choices=list(datasets.BAD_IMAGE_MODES),
                        help="unreadable image: stop naming it, or skip it with a warning")
    parser.add_argument("--num-classes", type=int, default=None, help="classifier outputs (default: the data set's)")

    parser.add_argument("--img-size", type=int, default=None, metavar="N", help="input size (default: from the cfg)")
    parser.add_argument("--crop-pct", type=float, default=None, metavar="P", help="centre crop fraction (default: cfg)")
    parser.add_argument("--crop-mode", default=None, choices=["center", "squash", "border"], help="default: cfg")
    parser.add_argument("--interpolation", default=None, metavar="NAME", help="resize interpolation (default: cfg)")

    parser.add_argument("--batch-size", "-b", type=int, default=256, metavar="N")
    parser.add_argument("--workers", "-j", type=int, default=4, metavar="N", help="data loading processes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", default="none", choices=["bfloat16", "float16", "none"], help="autocast dtype")
    parser.add_argument("--ssm-backend", default=None, choices=["auto", "torch", "mamba_ssm"],
                        help="SSM kernels (default: $SSM_BACKEND or auto)")
    parser.add_argument("--log-freq", type=int, default=10, metavar="N", help="progress line every N batches")
    parser.add_argument("--results-file", default="", metavar="CSV", help="write the rows to this CSV file")
    return parser


def pairs(args):
    """(model, checkpoint or None) of every row."""
    models, checkpoints = args.model, args.checkpoint or [None]
    if len(models) == len(checkpoints):
        return list(zip(models, checkpoints))
    if len(models) == 1:
        return [(models[0], path) for path in checkpoints]
    if len(checkpoints) == 1:
        return [(name, checkpoints[0]) for name in models]
    raise SystemExit(f"{len(models)} models and {len(checkpoints)} checkpoints: give one checkpoint per model, "
                     f"one model or one checkpoint")


def validate(args, model_name, path, device):
    """One result row: timm validate.py's columns plus loss and throughput."""
    inference.check_model_name(model_name)
    cfg_name = inference.released_cfg(model_name, args.img_size, path) or model_name
    data_config = inference.eval_data_config(cfg_name, args.img_size, args.crop_pct, args.crop_mode,
                                             args.interpolation)
    size = data_config["input_size"][-1]
    data_args = argparse.Namespace(data_set=args.data_set, data_path=args.data_dir, input_size=size,
                                   inat_category=args.inat_category, bad_images=args.bad_images)
    dataset, nb_classes = datasets.build_dataset(is_train=False, args=data_args,
                                                 transform=create_transform(**data_config, is_training=False))
    num_classes = args.num_classes or nb_classes
    released_classes = get_pretrained_cfg(cfg_name).num_classes
    if path is None and num_classes != released_classes:
        raise SystemExit(f"the released {cfg_name} weights classify {released_classes} classes, the {args.data_set} "
                         f"data set has {num_classes}; evaluate a --checkpoint instead")
    model = inference.create_classifier_or_exit(cfg_name, path, pretrained=path is None, num_classes=num_classes,
                                                use_ema=args.use_ema, img_size=size, **args.model_kwargs)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                                         pin_memory=device.type == "cuda", drop_last=False)
    print(f"Validating {cfg_name}" + (f" from {path}" if path else " (released weights)")
          + f": {len(dataset)} images at {size} px, crop {data_config['crop_pct']} ({data_config['crop_mode']}), "
          + data_config["interpolation"])
    start = time.perf_counter()
    stats = evaluate(loader, model.to(device), device, args.amp, args.log_freq)
    seconds = time.perf_counter() - start
    return dict(
        model=model_name, checkpoint=path or "",
        top1=round(stats["acc1"], 4), top1_err=round(100 - stats["acc1"], 4),
        top5=round(stats["acc5"], 4), top5_err=round(100 - stats["acc5"], 4),
        loss=round(stats["loss"], 4), param_count=round(utils.count_parameters(model, trainable_only=False) / 1e6, 2),
        img_size=size, crop_pct=data_config["crop_pct"], crop_mode=data_config["crop_mode"],
        interpolation=data_config["interpolation"], img_per_sec=round(len(dataset) / seconds, 2),
    )


def write_results(path, rows):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main(args):
    """Every row; data, checkpoint and backend problems end the run with one line instead of a traceback."""
    for key, flag in (("img_size", "--img-size"), ("num_classes", "--num-classes")):
        if key in args.model_kwargs:
            raise SystemExit(f"--model-kwargs {key}=... is set by {flag}; use that flag")
    try:
        if args.ssm_backend:
            kernels.set_backend(args.ssm_backend)
        device = utils.resolve_device(args)
        rows = [validate(args, name, path, device) for name, path in pairs(args)]
    except (datasets.DatasetError, checkpoint.CheckpointError, kernels.BackendUnavailableError) as err:
        raise SystemExit(f"error: {err}") from None
    if args.results_file:
        write_results(args.results_file, rows)
    print(f"--result\n{json.dumps(rows, indent=4)}")
    return rows


if __name__ == "__main__":
    main(get_args_parser().parse_args())
