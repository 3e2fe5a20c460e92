"""``python -m train``: demo-data, split, fit, evaluate, export, verify, quantize, report, import.

Parsing only; each subcommand calls one function of the Python API."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from lcnet_runner.artifact import ModelNotFoundError
from lcnet_runner.cli import add_engine_arguments
from lcnet_runner.preprocess import InvalidImageError

from .pretrained import PretrainedError
from .split import DatasetError

# Errors that mean "the user asked for something impossible": one line, exit code 2.
USER_ERRORS = (
    DatasetError,
    ModelNotFoundError,
    InvalidImageError,
    PretrainedError,
    ValueError,
    FileNotFoundError,
)


def _pair(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX, got {text!r}") from None
    return low, high


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated epochs, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from .fit import FitConfig
    from .model import SCALES

    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo-data", help="write a synthetic shapes dataset (ImageNet layout)")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--images-per-class", type=int, default=100)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("split", help="split DATASET/<class>/<images> into train/val/test lists")
    p.add_argument("dataset", type=Path)
    p.add_argument("--val-ratio", "--val_value", type=float, default=0.2)
    p.add_argument("--test-ratio", "--test_value", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)

    d = FitConfig()
    p = sub.add_parser("fit", help="train, evaluate, export and save to the BentoML store")
    p.add_argument("dataset", type=Path)
    p.add_argument("--model", default=d.model, help=f"one of {', '.join(SCALES)}")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--schedule", choices=("piecewise", "cosine"), default=d.schedule)
    p.add_argument("--lr-decay-epochs", type=_ints, default=d.lr_decay_epochs, metavar="E,E,...")
    p.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--input-size", type=int, default=d.input_size)
    p.add_argument("--resize-short", type=int, default=d.resize_short)
    p.add_argument("--crop-scale", type=_pair, default=d.crop_scale, metavar="MIN,MAX")
    p.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=d.hflip)
    p.add_argument(
        "--pretrained",
        default=d.pretrained,
        help="imagenet | imagenet-ssld | none | PATH.pdparams (default: imagenet)",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--workers", type=int, default=d.workers, help="decoding threads (0: all cores)")
    p.add_argument("--threads", type=int, default=d.threads, help="Paddle threads (0: all cores)")
    p.add_argument("--early-stop-patience", type=int, default=d.early_stop_patience)
    p.add_argument("--save-dir", default=d.save_dir)
    p.add_argument("--name", default=d.name, help="model name in the BentoML store")
    p.add_argument("--resume", action="store_true", help="continue from SAVE_DIR/last.pdckpt")
    p.add_argument(
        "--int8",
        action="store_true",
        help="also store an INT8 OpenVINO variant calibrated on training images (int8 extra)",
    )
    p.add_argument(
        "--procs",
        default="auto",
        help="data-parallel processes on this machine: N, or auto (one per core while "
        "each gets >= 8 images a step)",
    )

    p = sub.add_parser("evaluate", help="accuracy of a stored or exported model on a split")
    p.add_argument("model", help="store tag (pplcnet:latest) or exported folder")
    p.add_argument("--dataset", type=Path, required=True)
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    # A named variant is measured whatever its guard figures say, next to paddle fp32.
    add_engine_arguments(p, skip_guard=False)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--confusion-matrix",
        default="confusion_matrix.png",
        metavar="PNG",
        help="where to write the confusion matrix (default: ./confusion_matrix.png)",
    )

    p = sub.add_parser("export", help="add another inference format to a stored or exported model")
    p.add_argument("model", help="store tag (pplcnet:latest) or exported folder")
    p.add_argument(
        "--format",
        choices=("onnx", "openvino"),
        default="onnx",
        help="onnx: inference.onnx (onnxruntime, openvino engines); openvino: inference.xml",
    )

    p = sub.add_parser(
        "verify", help="measure every engine/precision against paddle fp32 (the accuracy guard)"
    )
    p.add_argument("model", help="store tag (pplcnet:latest) or exported folder")
    p.add_argument("--dataset", type=Path, required=True)
    p.add_argument("--split", default="val", choices=("train", "val", "test"))
    p.add_argument("--threads", type=int, default=None)

    p = sub.add_parser("quantize", help="add an INT8 OpenVINO variant, then verify (int8 extra)")
    p.add_argument("model", help="store tag (pplcnet:latest) or exported folder")
    p.add_argument("--dataset", type=Path, required=True, help="calibrates on its train split")
    p.add_argument("--calibration-images", type=int, default=300)
    p.add_argument("--split", default="val", choices=("train", "val", "test"),
                   help="where the accuracy guard is measured")  # fmt: skip
    p.add_argument("--threads", type=int, default=None)

    p = sub.add_parser("report", help="summary of a stored or exported model")
    p.add_argument("model", help="store tag (pplcnet:latest) or exported folder")

    p = sub.add_parser("import", help="store a PaddleClas .pdparams or an exported folder")
    p.add_argument("source", type=Path)
    p.add_argument("--name", default="pplcnet")
    p.add_argument("--model", help="architecture, e.g. PPLCNet_x1_0 (needed for .pdparams)")
    p.add_argument("--labels", type=Path, help="class names, one per line")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--resize-short", type=int, default=256)
    return parser


def run(args: argparse.Namespace) -> None:
    if args.command == "demo-data":
        from .demo_data import write_demo_dataset

        classes = write_demo_dataset(
            args.out_dir, args.images_per_class, args.image_size, args.seed
        )
        print(
            f"wrote {args.images_per_class} images for each of {', '.join(classes)} "
            f"to {args.out_dir}"
        )
    elif args.command == "split":
        from .split import split_dataset

        result = split_dataset(args.dataset, args.val_ratio, args.test_ratio, args.seed)
        print(
            f"{len(result.labels)} classes; train {result.counts['train']}, "
            f"val {result.counts['val']}, test {result.counts['test']} images"
        )
        if result.skipped:
            print(f"skipped {len(result.skipped)} unreadable images: {', '.join(result.skipped)}")
    elif args.command == "fit":
        from . import distributed
        from .fit import FitConfig, fit

        procs = distributed.auto_procs(args.batch_size) if args.procs == "auto" else int(args.procs)
        if procs > 1 and "PADDLE_TRAINERS_NUM" not in os.environ:
            cores = len(os.sched_getaffinity(0))
            threads = args.threads or max(1, cores // procs)
            fit_args = args.argv[args.argv.index("fit") + 1 :]  # later --procs/--threads win
            print(
                f"training with {procs} data-parallel processes x {threads} threads "
                f"(logs of every rank in {args.save_dir}/logs)",
                file=sys.stderr,
            )
            code = distributed.launch(fit_args, procs, Path(args.save_dir) / "logs", threads)
            if code:
                raise SystemExit(code)
            return
        skip = ("command", "dataset", "procs", "argv")
        options = {k: v for k, v in vars(args).items() if k not in skip}
        options["save_dir"] = str(options["save_dir"])
        summary = fit(args.dataset, FitConfig(**options))
        if "tag" not in summary:  # a data-parallel rank other than 0: rank 0 reports
            return
        print(f"saved {summary['tag']} to the BentoML store")
        print(json.dumps(summary))
    elif args.command == "evaluate":
        from .evaluate import evaluate

        report = evaluate(args.model, args.dataset, args.split, engine=args.engine,
                          precision=args.precision, threads=args.threads,
                          confusion_png=args.confusion_matrix)  # fmt: skip
        print(json.dumps(report, ensure_ascii=False))
    elif args.command == "export":
        from .export import add_format

        print(f"{args.format}: {add_format(args.model, args.format)}")
    elif args.command in ("verify", "quantize"):
        from .guard import describe, verify
        from .quantize import quantize

        if args.command == "verify":
            result, figures = verify(args.model, args.dataset, args.split, args.threads)
        else:
            result, figures = quantize(args.model, args.dataset, split=args.split,
                                       calibration_images=args.calibration_images,
                                       threads=args.threads)  # fmt: skip
        print(describe(figures))
        print(f"saved as {result}")
    elif args.command == "report":
        from .report import report

        print(report(args.model))
    elif args.command == "import":
        from .importer import import_model

        tag = import_model(
            args.source,
            name=args.name,
            model=args.model,
            labels=args.labels,
            input_size=args.input_size,
            resize_short=args.resize_short,
        )
        print(f"imported {args.source} as {tag}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
