"""``python -m lcnet_runner predict IMAGE... --model pplcnet:latest --top-k 3 [--benchmark N]``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .artifact import DEFAULT_MODEL, ModelNotFoundError
from .preprocess import (
    IMAGE_EXTENSIONS,
    InvalidImageError,
    is_image_file,
    read_own_images_at_any_size,
)

if TYPE_CHECKING:  # the Predictor's engines load on first use: `train --help` imports this module
    from .predictor import Prediction, Predictor, Timings


def json_line(value: object) -> str:
    """JSON on exactly one line, readable (non-ASCII kept) yet safe for line-based readers:
    U+2028/U+2029, legal inside JSON strings and in class names, are line breaks to
    ``str.splitlines()`` and JavaScript, so they are escaped."""
    text = json.dumps(value, ensure_ascii=False)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    return _at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An argparse type: a whole number >= 0 (--threads 0: every core; --benchmark 0: off)."""
    return _at_least(text, 0)


def _at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a whole number >= {minimum}, got {text!r}"
        ) from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    return value


def add_engine_arguments(parser: argparse.ArgumentParser, skip_guard: bool = True) -> None:
    """--engine, --precision (and --skip-guard), shared with ``python -m train evaluate``."""
    parser.add_argument(
        "--engine",
        default="auto",
        help="auto | paddle | onnxruntime | openvino (auto: the fastest that passed the "
        "accuracy guard on this model)",
    )
    parser.add_argument("--precision", default="auto", help="auto | fp32 | bf16 | int8")
    if skip_guard:
        parser.add_argument(
            "--skip-guard",
            action="store_true",
            help="use the engine/precision even without passing accuracy-guard figures",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lcnet_runner")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="classify images and print the latency block")
    p.add_argument("images", nargs="+", type=Path, help="image files, or folders of them")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"store tag or exported folder (default: {DEFAULT_MODEL})")  # fmt: skip
    p.add_argument("--top-k", type=positive_int, default=1)
    p.add_argument("--batch-size", type=positive_int, default=1)
    # Negative counts are not refused by every engine (Paddle, ONNX Runtime) nor the same way.
    p.add_argument("--threads", type=non_negative_int, default=None,
                   help="engine threads (default, or 0: all cores)")  # fmt: skip
    add_engine_arguments(p)
    p.add_argument(
        "--benchmark",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="repeat the prediction N times and report the timing of those runs",
    )
    p.add_argument(
        "--annotate",
        type=Path,
        metavar="OUT",
        help="write the image with its top class drawn on it (a folder for several images)",
    )
    return parser


def predict(args: argparse.Namespace) -> None:
    """Classify every image; one that cannot be decoded is answered with its error and the others
    are still classified (``InvalidImageError`` at the end: exit code 2, one line)."""
    from .predictor import Predictor, Timings

    args.images = images_in(args.images)
    missing = [str(path) for path in args.images if not path.is_file()]
    if missing:  # before the slow model load: a typo, not an image to skip
        what = "not a file" if all(Path(p).exists() for p in missing) else "no such image"
        raise FileNotFoundError(f"{what}: {', '.join(missing)}")
    targets = annotation_targets(args.images, args.annotate) if args.annotate else []
    predictor = Predictor(
        args.model, engine=args.engine, precision=args.precision, threads=args.threads,
        batch_size=args.batch_size, skip_guard=args.skip_guard,
        race_in_child=True,  # an engine's native fault in the race: that variant's, not ours
    )  # fmt: skip
    answers, timings = classify_each(predictor, args.images, args.top_k)
    for path, answer in zip(args.images, answers, strict=True):
        key = "error" if isinstance(answer, str) else "predictions"
        print(json_line({"image": str(path), key: answer}))
    good = [i for i, answer in enumerate(answers) if not isinstance(answer, str)]
    if args.annotate and good:
        if len(args.images) > 1:  # several are drawn into one folder
            args.annotate.mkdir(parents=True, exist_ok=True)
        for i in good:
            write_annotated(args.images[i], answers[i], targets[i])
    if good:  # `pplcnet:latest` names a version that changes: which one answered
        print(f"model: {predictor.artifact.name} on {predictor.choice.variant}")
    if args.benchmark and good:  # the repeated runs only: the first one includes warm-up
        print(f"engine: {predictor.choice.describe()}")
        timings = Timings()
        for _ in range(args.benchmark):
            predictor.predict([args.images[i] for i in good], top_k=args.top_k)
            timings += predictor.timings
    if good:
        print(timings.latency_block(args.batch_size))
    failed = [answer for answer in answers if isinstance(answer, str)]
    if failed:
        others = len(failed) - 1
        also = f" (and {others} other image{'s' * (others > 1)} not classified)" if others else ""
        raise InvalidImageError(failed[0] + also)


def images_in(paths: list[Path]) -> list[Path]:
    """The images named: a folder stands for the image files directly inside it, by name (as
    PaddleX's predict takes a folder); ValueError for a folder with none."""
    images = []
    for path in paths:
        if not path.is_dir():
            images.append(path)
        elif found := sorted(p for p in path.iterdir() if is_image_file(p)):
            images += found
        else:
            kinds = "/".join(sorted(ext.lstrip(".") for ext in IMAGE_EXTENSIONS))
            raise ValueError(f"{path}: a folder with no {kinds} image in it")
    return images


def classify_each(
    predictor: Predictor, images: list[Path], top_k: int
) -> tuple[list[list[Prediction] | str], Timings]:
    """Per image, its predictions or why it could not be decoded (a message naming it), and the
    timings of what was classified: a batch with a bad image is classified again image by image,
    so one broken file among a thousand loses nothing but itself."""
    from .predictor import Timings

    answers: list[list[Prediction] | str] = []
    timings = Timings()
    for start in range(0, len(images), predictor.batch_size):
        chunk = images[start : start + predictor.batch_size]
        try:
            answers.extend(predictor.predict(chunk, top_k=top_k))
            timings += predictor.timings
        except InvalidImageError:  # which one(s)? each image of the batch on its own
            for image in chunk:
                try:
                    answers.append(predictor.predict(image, top_k=top_k))
                    timings += predictor.timings
                except InvalidImageError as err:
                    answers.append(str(err))
    return answers, timings


# Written into every drawing --annotate saves: a file with it is one predict may replace.
ANNOTATED_MARK = b"drawn by lcnet-bento predict --annotate"


def annotation_targets(images: list[Path], out: Path) -> list[Path]:
    """Where ``--annotate OUT`` draws each image: OUT itself for one image (OUT/<name>.jpg if OUT
    is a folder), OUT/<name>.jpg for several. Refused before any work when that would lose a
    file: two images of one name, or a file there that predict did not draw (an input image, a
    dataset's photo, anything else)."""
    several = len(images) > 1
    if several:
        named_like_a_file = out.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp")
        if out.is_file() or (named_like_a_file and not out.exists()):
            raise ValueError(f"--annotate {out}: not a folder (several images go in one)")
        stems = Counter(path.stem for path in images)
        if same := [str(path) for path in images if stems[path.stem] > 1]:
            raise ValueError(
                f"--annotate: {', '.join(same)} share a name, so their drawings in {out} would "
                "overwrite each other"
            )
    into = several or out.is_dir()
    targets = [out / f"{path.stem}.jpg" if into else out for path in images]
    if kept := [str(target) for target in targets if target.is_file() and not _drawn(target)]:
        raise ValueError(
            f"--annotate: {', '.join(kept)} exists and is not a drawing of predict's; "
            "choose another place"
        )
    return targets


def _drawn(path: Path) -> bool:
    """Whether ``path`` is a drawing --annotate saved (its JPEG comment says so)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.info.get("comment") == ANNOTATED_MARK
    except (OSError, ValueError, SyntaxError):
        return False


def write_annotated(image: Path, predictions: list[Prediction], target: Path) -> None:
    from .annotate import annotate
    from .preprocess import load_image

    annotate(load_image(image), predictions).save(target, quality=92, comment=ANNOTATED_MARK)
    print(f"wrote {target}", file=sys.stderr)


def error_line(err: Exception) -> str:
    """The message of a user error; an OSError as "PATH: reason" rather than its
    "[Errno 17] File exists: 'PATH'" (the path as given, not repr's escapes)."""
    if isinstance(err, OSError) and err.strerror and err.filename is not None:
        paths = [p for p in (err.filename, err.filename2) if p is not None]
        where = " -> ".join(
            os.fsdecode(p) if isinstance(p, (str, bytes)) else str(p) for p in paths
        )
        return f"{where}: {err.strerror}"
    return str(err)


def reader_gone() -> int:
    """The exit code when stdout's reader has gone (``... | head``): not the command's error.
    Whatever is left to print goes nowhere: Python flushes stdout at exit, and would fail again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    read_own_images_at_any_size()
    try:
        predict(args)
    except BrokenPipeError:
        return reader_gone()
    except (ModelNotFoundError, InvalidImageError, ValueError, OSError) as err:
        # OSError: a missing file, a file where a folder should be, no permission, a full disk...
        print(f"error: {error_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, as `python -m train` says it, no traceback
        print("interrupted", file=sys.stderr)
        return 130
    return 0
