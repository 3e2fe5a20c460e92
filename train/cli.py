"""Train, evaluate, export and import PP-LCNet models, and store them in the BentoML store.

Subcommands: demo-data, split, fit, evaluate, export, verify, quantize, report, import, cache.
``build_parser`` parses; each subcommand is a ``run_*`` function (``set_defaults(func=...)``)
that calls one function of the Python API and prints its result; ``main`` maps user errors to
one line and exit code 2."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

from lcnet_runner.artifact import ModelNotFoundError
from lcnet_runner.cli import (
    add_engine_arguments,
    error_line,
    json_line,
    non_negative_int,
    reader_gone,
)
from lcnet_runner.preprocess import (
    RESIZE_BACKENDS,
    InvalidImageError,
    read_own_images_at_any_size,
)

from .console import Stopped, log, sigterm_stops
from .pretrained import PretrainedError
from .split import SPLITS, DatasetError

# Errors that mean "the user asked for something impossible": one line, exit code 2.
USER_ERRORS = (
    DatasetError,
    ModelNotFoundError,
    InvalidImageError,
    PretrainedError,
    ValueError,
    OSError,  # a missing file, a file where a folder should be, no permission, a full disk...
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


def _ratio(text: str) -> float:
    """A split's share of each class, named by its flag when it is not one (the library's own
    check names its parameter)."""
    try:
        ratio = float(text)
    except ValueError:
        ratio = float("nan")
    if not 0 <= ratio < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction from 0 to below 1, got {text!r}")
    return ratio


def _procs(text: str) -> str:
    if text == "auto" or (text.isascii() and text.isdigit() and 1 <= int(text) <= 1024):
        return text
    raise argparse.ArgumentTypeError(f"expected auto or a count from 1 to 1024, got {text!r}")


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default after its help, unless the help says it in words already (those
    showed it twice: "(default: $LCNET_CACHE or ~/.cache/lcnet-bento) (default: )") or it is a
    flag, off unless given ("--resume ... (default: False)")."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if "(default" in (action.help or "") or (action.nargs == 0 and action.default is False):
            return action.help
        return super()._get_help_string(action)


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """Where decoded splits are cached, and which stay in RAM (``train.decoded_cache``)."""
    from .decoded_cache import RAM_MB

    parser.add_argument(
        "--cache-dir",
        default="",
        help="decoded splits are cached in CACHE_DIR/decoded (default: $LCNET_CACHE or "
        "~/.cache/lcnet-bento)",
    )
    parser.add_argument(
        "--ram-cache-mb",
        type=float,
        default=RAM_MB,
        metavar="MB",
        help=f"splits decoding to less stay in RAM, larger ones are cached on disk "
        f"(default {RAM_MB}; 0: every split on disk)",
    )


def cache_config(args: argparse.Namespace):
    from .decoded_cache import CacheConfig

    return CacheConfig(Path(args.cache_dir) if args.cache_dir else None, args.ram_cache_mb)


def build_parser() -> argparse.ArgumentParser:
    description = __doc__.splitlines()[0]  # the rest is for readers of this file
    parser = argparse.ArgumentParser(prog="python -m train", description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_dataset_commands(sub)
    _add_fit(sub)
    _add_model_commands(sub)
    p = sub.add_parser("cache", help="list or delete decoded caches (never pretrained weights)")
    p.set_defaults(func=run_cache)
    p.add_argument("action", choices=("list", "clear"))
    p.add_argument("--cache-dir", default="", help="default: $LCNET_CACHE or ~/.cache/lcnet-bento")
    p.add_argument("--stale", action="store_true",
                   help="clear: only the caches `list` marks stale (dataset or split list gone, "
                        "or the list changed since)")  # fmt: skip
    return parser


def _add_dataset_commands(sub) -> None:
    p = sub.add_parser("demo-data", help="write a synthetic shapes dataset (ImageNet layout)")
    p.set_defaults(func=run_demo_data)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--images-per-class", type=int, default=100)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("split", help="split DATASET/<class>/<images> into train/val/test lists",
                       formatter_class=DefaultsHelpFormatter)  # fmt: skip
    p.set_defaults(func=run_split)
    p.add_argument("dataset", type=Path, help="a folder of class folders of images")
    p.add_argument("--val-ratio", "--val_value", type=_ratio, default=0.2,
                   help="each class's share for validation")  # fmt: skip
    p.add_argument("--test-ratio", "--test_value", type=_ratio, default=0.1,
                   help="each class's share for the final test")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="the order images are drawn in")
    p.add_argument(
        "--reshuffle",
        action="store_true",
        help="split afresh; by default images already listed keep their split",
    )


def _add_fit(sub) -> None:
    from .config import SCALES, FitConfig

    d = FitConfig()
    p = sub.add_parser("fit", help="train, evaluate, export and save to the BentoML store",
                       formatter_class=DefaultsHelpFormatter)  # fmt: skip
    p.set_defaults(func=run_fit)
    p.add_argument("dataset", type=Path, help="the split folder (python -m train split)")
    p.add_argument("--model", default=d.model, help=f"one of {', '.join(SCALES)}")
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the train split")
    p.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help="images a step, all processes together (16+: data-parallel on 2 cores)",
    )
    p.add_argument("--lr", type=float, default=d.lr, help="learning rate")
    p.add_argument(
        "--schedule",
        choices=("piecewise", "cosine"),
        default=d.schedule,
        help="how the learning rate falls",
    )
    p.add_argument(
        "--lr-decay-epochs",
        type=_ints,
        default=argparse.SUPPRESS,  # absent unless given: FitConfig derives it, or --resume keeps
        metavar="E,E,...",
        help="piecewise: ×0.1 after each (default: at 40, 60, 80 %% of --epochs; with --resume, "
        "that run's)",
    )
    p.add_argument(
        "--warmup-epochs",
        type=int,
        default=d.warmup_epochs,
        help="epochs the learning rate rises from 0",
    )
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="L2")
    p.add_argument(
        "--input-size",
        type=int,
        default=argparse.SUPPRESS,  # absent unless given: --resume keeps that run's
        help=f"the model's input, px (default: {d.input_size}; with --resume, that run's)",
    )
    p.add_argument(
        "--resize-short",
        type=int,
        default=argparse.SUPPRESS,  # absent unless given: FitConfig derives it, or --resume keeps
        help="short side before the center crop where the model evaluates and serves "
        "(default: --input-size × 256/224; with --resume, that run's)",
    )
    p.add_argument(
        "--resize-backend",
        choices=RESIZE_BACKENDS,
        default=argparse.SUPPRESS,  # absent unless given: --resume keeps that run's
        help=f"what resizes, in training and wherever the model serves (default: "
        f"{d.resize_backend}; with --resume, that run's)",
    )
    p.add_argument(
        "--crop-scale",
        type=_pair,
        default=d.crop_scale,
        metavar="MIN,MAX",
        help=f"training's random crops: their share of the image's area (default: "
        f"{','.join(map(str, d.crop_scale))})",  # as typed, not a Python tuple
    )
    p.add_argument(
        "--hflip",
        action=argparse.BooleanOptionalAction,
        default=d.hflip,
        help="training's random horizontal flips",
    )
    p.add_argument(
        "--pretrained",
        default=d.pretrained,
        help="imagenet | imagenet-ssld | none | PATH.pdparams (a pickle: it runs code, so only "
        "files you trust)",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="the split order and augmentation")
    p.add_argument(
        "--workers",
        type=non_negative_int,
        default=d.workers,
        help="decoding threads (0: all cores)",
    )
    p.add_argument(
        "--threads", type=non_negative_int, default=d.threads, help="Paddle threads (0: all cores)"
    )
    add_cache_arguments(p)
    p.add_argument(
        "--early-stop-patience",
        type=int,
        default=d.early_stop_patience,
        help="stop after this many epochs without a better val top-1 (0: never)",
    )
    p.add_argument(
        "--save-dir", default=d.save_dir, help="checkpoints, history, plots and the export"
    )
    p.add_argument("--name", default=d.name, help="model name in the BentoML store")
    p.add_argument("--resume", action="store_true",
                   help="continue from SAVE_DIR/last.pdckpt (a pickle, as .pdparams)")  # fmt: skip
    p.add_argument(
        "--int8",
        action="store_true",
        help="also store an INT8 OpenVINO variant calibrated on training images (int8 extra)",
    )
    p.add_argument("--procs", type=_procs, default="auto",
                   help="data-parallel processes on this machine: N, or auto (one per core while "
                   "each gets >= 8 images a step)")  # fmt: skip


MODEL_SOURCE = "store tag (pplcnet:latest) or exported folder"


def _measured_on(p: argparse.ArgumentParser, split: str, split_help: str | None = None) -> None:
    """The labelled images a command measures a model on: a dataset's split, decoded (cached)."""
    p.add_argument("--dataset", type=Path, required=True)
    p.add_argument("--split", default=split, choices=SPLITS, help=split_help)
    p.add_argument("--threads", type=non_negative_int, default=None)
    add_cache_arguments(p)


def _add_model_commands(sub) -> None:
    """The commands that take a stored or exported model."""
    p = sub.add_parser("evaluate", help="accuracy of a stored or exported model on a split")
    p.set_defaults(func=run_evaluate)
    p.add_argument("model", help=MODEL_SOURCE)
    # A named variant is measured whatever its guard figures say, next to paddle fp32.
    add_engine_arguments(p, skip_guard=False)
    _measured_on(p, "test")
    p.add_argument(
        "--confusion-matrix",
        default="confusion_matrix.png",
        metavar="PNG",
        help="where to write the confusion matrix (default: ./confusion_matrix.png)",
    )

    p = sub.add_parser("export", help="add another inference format to a stored or exported model")
    p.set_defaults(func=run_export)
    p.add_argument("model", help=MODEL_SOURCE)
    p.add_argument(
        "--format",
        choices=("onnx", "openvino"),
        default="onnx",
        help="onnx: inference.onnx (onnxruntime, openvino engines); openvino: inference.xml",
    )

    p = sub.add_parser(
        "verify", help="measure every engine/precision against paddle fp32 (the accuracy guard)"
    )
    p.set_defaults(func=run_verify)
    p.add_argument("model", help=MODEL_SOURCE)
    _measured_on(p, "val")

    p = sub.add_parser("quantize", help="add an INT8 OpenVINO variant, then verify (int8 extra)")
    p.set_defaults(func=run_quantize)
    p.add_argument("model", help=MODEL_SOURCE)
    _measured_on(p, "val", "where the accuracy guard is measured (it calibrates on train)")
    p.add_argument("--calibration-images", type=int, default=300)

    p = sub.add_parser("report", help="summary of a stored or exported model")
    p.set_defaults(func=run_report)
    p.add_argument("model", help=MODEL_SOURCE)

    p = sub.add_parser(
        "import",
        help="store a PaddleClas .pdparams (a pickle: only files you trust) or an exported folder",
    )
    p.set_defaults(func=run_import)
    p.add_argument("source", type=Path)
    p.add_argument("--name", default="pplcnet")
    p.add_argument("--model", help="architecture, e.g. PPLCNet_x1_0 (needed for .pdparams)")
    p.add_argument("--labels", type=Path, help="class names, one per line")
    p.add_argument("--input-size", type=int, default=224, help=".pdparams: the model's input, px")
    p.add_argument(
        "--resize-short",
        type=int,
        default=0,
        help=".pdparams: short side before the center crop (0: input size × 256/224)",
    )


def run_demo_data(args: argparse.Namespace) -> None:
    from .demo_data import write_demo_dataset

    classes = write_demo_dataset(args.out_dir, args.images_per_class, args.image_size, args.seed)
    print(
        f"wrote {args.images_per_class} images for each of {', '.join(classes)} to {args.out_dir}"
    )


def run_split(args: argparse.Namespace) -> None:
    from .split import split_dataset

    result = split_dataset(
        args.dataset, args.val_ratio, args.test_ratio, args.seed, reshuffle=args.reshuffle
    )
    print(
        f"{len(result.labels)} classes; train {result.counts['train']}, "
        f"val {result.counts['val']}, test {result.counts['test']} images"
    )
    for line in result.notes():
        print(line)


def fit_config(args: argparse.Namespace):
    """The FitConfig of `fit`'s arguments: every option it has (others, such as --procs, are the
    launcher's); those not given (--resize-short, --lr-decay-epochs) it derives, and with
    --resume the input size, resize-short, backend and decay epochs not given are that run's."""
    from .config import FitConfig
    from .training import config_of

    options = {f.name: getattr(args, f.name) for f in fields(FitConfig) if hasattr(args, f.name)}
    return config_of({**options, "save_dir": str(args.save_dir)})


def run_fit(args: argparse.Namespace) -> None:
    from . import distributed
    from .training import CONFUSION, CURVES, fit_prepared, prepare, writing_to

    # Validated here, before any rank starts: a rank's error would only reach its log file;
    # prepared once: ranks would each download and split, into one file.
    config = fit_config(args)
    weights = prepare(Path(args.dataset), config)
    fit_args = args.argv[args.argv.index("fit") + 1 :]  # each rank re-parses them as given
    # The launcher's while its ranks train, else this process's while it trains.
    with writing_to(Path(config.save_dir)):
        if distributed.run_data_parallel(
            fit_args, args.procs, args.batch_size, args.threads, args.save_dir
        ):
            return
        summary = fit_prepared(Path(args.dataset), config, weights)
    if "tag" not in summary:  # a data-parallel rank other than 0: rank 0 reports
        return
    print(f"saved {summary['tag']} to the BentoML store")
    print(json_line(summary))
    plots = [str(path) for name in (CURVES, CONFUSION)
             if (path := Path(config.save_dir) / name).is_file()]  # fmt: skip
    log(
        f"plots: {', '.join(plots)}\nnext: python -m train report {summary['tag']}  |  python "
        f"-m lcnet_runner predict --model {summary['tag']} IMAGE  |  LCNET_MODEL={config.name} "
        "bentoml serve ."
    )


def run_evaluate(args: argparse.Namespace) -> None:
    from .evaluation import evaluate

    metrics = evaluate(args.model, args.dataset, args.split, engine=args.engine,
                      precision=args.precision, threads=args.threads,
                      confusion_png=args.confusion_matrix, cache=cache_config(args))  # fmt: skip
    print(json_line(metrics))


def run_export(args: argparse.Namespace) -> None:
    from .export import add_format

    print(f"{args.format}: {add_format(args.model, args.format)}")


def run_verify(args: argparse.Namespace) -> None:
    from .guard import describe, verify

    result, figures = verify(args.model, args.dataset, args.split, args.threads,
                             cache_config(args))  # fmt: skip
    print(describe(figures))
    print(f"saved as {result}")


def run_quantize(args: argparse.Namespace) -> None:
    from .guard import describe
    from .quantize import quantize

    result, figures = quantize(args.model, args.dataset, split=args.split,
                               calibration_images=args.calibration_images,
                               threads=args.threads, cache=cache_config(args))  # fmt: skip
    print(describe(figures))
    print(f"saved as {result}")


def run_cache(args: argparse.Namespace) -> None:
    from .decoded_cache import (
        CacheConfig,
        clear_caches,
        folder_bytes,
        list_caches,
        size_text,
        unfinished_builds,
    )

    cache = CacheConfig(Path(args.cache_dir) if args.cache_dir else None)
    if args.action == "list":
        entries = list_caches(cache)
        for entry in entries:
            print(entry.line())
        for temp in unfinished_builds(cache):
            print(f"{temp.name}  unfinished build  {size_text(folder_bytes(temp)):>9s}")
        total = size_text(sum(entry.bytes for entry in entries))
        print(f"{len(entries)} decoded caches, {total}, in {cache.folder}")
    else:
        count, freed = clear_caches(cache, stale_only=args.stale)
        print(f"removed {count} {'stale ' * args.stale}decoded caches ({size_text(freed)}) from "
              f"{cache.folder}; pretrained weights and engine choices kept")  # fmt: skip


def run_report(args: argparse.Namespace) -> None:
    from .report import report

    print(report(args.model))


def run_import(args: argparse.Namespace) -> None:
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


# The commands that load Paddle, which sets a SIGTERM handler of its own as it loads (a C++ stack
# dump on stdout, then death; a child a library forks inherits it): loaded before sigterm_stops,
# so that its handler is the one in force. The others start faster without it.
PADDLE_COMMANDS = ("fit", "evaluate", "export", "verify", "quantize", "import")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    read_own_images_at_any_size()  # a dataset's, as predict's: a panorama is no attack
    started = time.time()
    try:
        if args.command in PADDLE_COMMANDS:
            import paddle  # noqa: F401
        with sigterm_stops():
            args.func(args)
    except BrokenPipeError:
        return reader_gone()
    except USER_ERRORS as err:
        print(f"error: {error_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted{resumable(args, started)}", file=sys.stderr)
        return 130
    except Stopped as stop:
        print(f"stopped ({stop}){resumable(args, started)}", file=sys.stderr)
        return 128 + stop.signum
    return 0


def resumable(args: argparse.Namespace, started: float) -> str:
    """What a stopped `fit` can do next, when it wrote a checkpoint after ``started`` (or was a
    resume already): one left by an earlier run is that run's; "" for the other commands."""
    from .config import CHECKPOINT

    if args.func is not run_fit:
        return ""
    checkpoint = Path(args.save_dir) / CHECKPOINT
    try:
        written_now = checkpoint.stat().st_mtime >= started
    except OSError:  # none
        return ""
    if not (args.resume or written_now):
        return ""
    return f" (the same command with --resume goes on from {checkpoint})"
