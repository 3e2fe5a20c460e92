"""The exported model folder: its files, how to write its metadata and how to read it back.

A folder (exported by ``train``, or by PaddleClas / PaddleX) holds::

    inference.json        the Paddle inference program (inference.pdmodel from Paddle 2)
    inference.pdiparams   the weights
    inference.onnx        the same network in ONNX (opset 17), when the onnx extra is installed
    inference.xml/.bin    OpenVINO IR (optional: `python -m train export --format openvino`)
    inference_int8.xml/.bin  INT8 OpenVINO IR (optional: `python -m train quantize`)
    inference.yml         preprocessing + labels, in the format paddlex.create_model reads
    labels.txt            one class name a line (optional when inference.yml has them)
    model_info.json       architecture, metrics, training facts, accuracy guard figures (ours)
    self_check.npz        64 val crops + Paddle fp32's scores: the guard re-run at load (ours)
    files.sha256          every file's SHA-256 when it was stored (``sha256sum -c`` reads it)

A model in the BentoML store is such a folder, with the same facts as store labels and metadata.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import logging
import os
import shlex
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .preprocess import PreprocessConfig

PROGRAM_FILES = ("inference.json", "inference.pdmodel")  # Paddle 3 (PIR) first, then Paddle 2
PARAMS_FILE = "inference.pdiparams"
ONNX_FILE = "inference.onnx"  # the same network for ONNX Runtime / OpenVINO (optional)
OPENVINO_FILE = "inference.xml"  # + inference.bin: OpenVINO IR, fp32 (optional)
INT8_FILE = "inference_int8.xml"  # + inference_int8.bin: OpenVINO IR quantized by NNCF (optional)
# Converted from the Paddle program, so stale as soon as it is exported again.
DERIVED_FILES = tuple(
    name for xml in (OPENVINO_FILE, INT8_FILE) for name in (xml, xml.replace(".xml", ".bin"))
) + (ONNX_FILE,)
SELF_CHECK_FILE = "self_check.npz"  # a sample + Paddle fp32's scores, re-checked where it serves
INFERENCE_YML = "inference.yml"
LABELS_FILE = "labels.txt"
INFO_FILE = "model_info.json"
CHECKSUM_FILE = "files.sha256"
STORE_FILE = "model.yaml"  # BentoML's own record of a store version, written after ours
DEFAULT_MODEL = "pplcnet:latest"
# Ours → the name PaddleX's ResizeImage takes for each backend (it rejects the other's names).
_PADDLEX_INTERPOLATION = {
    "cv2": {
        "nearest": "NEAREST",
        "bilinear": "LINEAR",
        "bicubic": "BICUBIC",
        "lanczos": "LANCZOS4",
    },
    "pil": {
        "nearest": "NEAREST",
        "bilinear": "BILINEAR",
        "bicubic": "BICUBIC",
        "lanczos": "LANCZOS4",
    },
}
_FROM_PADDLEX_INTERPOLATION = {
    name: ours for names in _PADDLEX_INTERPOLATION.values() for ours, name in names.items()
}


class ModelNotFoundError(LookupError):
    """A model tag or folder that cannot be loaded; the message says what to do."""


class InvalidModelError(ModelNotFoundError):
    """A model that is there but cannot be used: a file changed since it was stored, an
    ``inference.yml`` or ``model_info.json`` that does not read, labels that do not fit. A
    ModelNotFoundError too, so that code catching every model that cannot load still does."""


@dataclass(frozen=True)
class ModelArtifact:
    path: Path
    program_file: Path
    params_file: Path
    labels: tuple[str, ...]
    preprocess: PreprocessConfig
    info: dict[str, Any] = field(default_factory=dict)
    tag: str | None = None  # the store tag, when loaded from the store

    @property
    def name(self) -> str:
        return self.tag or str(self.path)

    @property
    def as_argument(self) -> str:
        """``name`` as a command to paste takes it: a folder's path quoted when it needs it
        (``'../out/all out/inference'``)."""
        return shlex.quote(self.name)


def paddlex_model_name(architecture: str) -> str:
    """PaddleX spells ``PPLCNet_x1_0`` as ``PP-LCNet_x1_0``."""
    return architecture.replace("PPLCNet", "PP-LCNet", 1)


@contextlib.contextmanager
def replaced_atomically(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write; once the block ends it is synced to disk and
    renamed over ``path``, so that readers (and a run after a crash) see the old file or the
    new one, never half of one. Nothing is left behind when the block fails."""
    # A plain name (rather than mkstemp) keeps the usual umask-based permissions.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())  # or a crash soon after may leave an empty file (XFS, ext4)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """``text`` written to ``path`` whole or not at all (``replaced_atomically``)."""
    with replaced_atomically(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="\n")


def read_lines(path: Path) -> list[str]:
    """A text file's lines exactly as written. Not ``str.splitlines()``: it also breaks on
    characters such as U+2028 that are legal in folder and file names. The BOM and ``"\r"``
    strips tolerate files edited on Windows; a file in another encoding is a ValueError
    naming it."""
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        # Python's own message names no file: for a labels.txt or list saved as GBK or Latin-1.
        line = data.count(b"\n", 0, err.start) + 1
        raise ValueError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x}); re-save the file as "
            "UTF-8"
        ) from None
    return [line.removesuffix("\r") for line in text.split("\n")]


def read_labels_file(path: Path) -> tuple[str, ...]:
    """Class names, one a line, in class-index order; edge spaces are part of a name (class
    folders may have them), empty lines are not names."""
    labels = tuple(line for line in read_lines(path) if line)
    if not labels:
        raise InvalidModelError(f"{path}: no class names (expected one per line)")
    return labels


def write_labels_file(path: Path, labels: Sequence[str]) -> None:
    """The one writer of ``labels.txt``, for datasets and models alike (read_labels_file)."""
    unwritable = [label for label in labels if not label or "\n" in label or "\r" in label]
    if unwritable:
        raise ValueError(f"class names must be non-empty single lines, got {unwritable!r}")
    write_text_atomic(path, "".join(f"{label}\n" for label in labels))


def write_info(folder: Path, info: dict[str, Any]) -> None:
    write_text_atomic(folder / INFO_FILE, json.dumps(info, indent=2, ensure_ascii=False) + "\n")


def write_metadata(
    folder: Path,
    *,
    architecture: str,
    labels: list[str],
    preprocess: PreprocessConfig,
    info: dict[str, Any],
) -> None:
    """Write inference.yml (PaddleX-compatible), labels.txt and model_info.json into ``folder``."""
    inference_yml = {
        "Global": {"model_name": paddlex_model_name(architecture)},
        "PreProcess": {
            "transform_ops": [
                {
                    "ResizeImage": {
                        "resize_short": preprocess.resize_short,
                        # PaddleX honours both, so it resizes exactly as we do.
                        "backend": preprocess.backend,
                        "interpolation": _PADDLEX_INTERPOLATION[preprocess.backend][
                            preprocess.interpolation
                        ],
                    }
                },
                {"CropImage": {"size": preprocess.crop_size}},
                {
                    "NormalizeImage": {
                        "channel_num": 3,
                        "mean": list(preprocess.mean),
                        "std": list(preprocess.std),
                        "order": "",
                        "scale": 1.0 / 255.0,
                    }
                },
                {"ToCHWImage": None},
            ]
        },
        "PostProcess": {"Topk": {"topk": min(5, len(labels)), "label_list": list(labels)}},
    }
    write_text_atomic(
        folder / INFERENCE_YML, yaml.safe_dump(inference_yml, sort_keys=False, allow_unicode=True)
    )
    write_labels_file(folder / LABELS_FILE, labels)
    write_info(folder, info)


def read_inference_yml(folder: Path) -> dict[str, Any]:
    """A folder's ``inference.yml`` as a mapping; a file that is not one is an InvalidModelError
    saying so on one line (it may come from another tool, or from a hand edit)."""
    path = folder / INFERENCE_YML
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise InvalidModelError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(config, dict):
        raise InvalidModelError(f"{path}: expected a mapping, got {type(config).__name__}")
    return config


def yml_section(config: dict[str, Any], *keys: str) -> dict[str, Any]:
    """``config[keys[0]][keys[1]]…``: missing or empty (``PostProcess:`` with nothing after it,
    which YAML reads as null) is ``{}``; anything but a mapping is an InvalidModelError."""
    section: Any = config
    for depth, key in enumerate(keys, 1):
        section = section.get(key) or {}
        if not isinstance(section, dict):
            where = ".".join(keys[:depth])
            raise InvalidModelError(f"{INFERENCE_YML}: {where} must be a mapping")
    return section


def preprocess_from_inference_yml(config: dict[str, Any]) -> PreprocessConfig:
    """Read our PreprocessConfig back from PaddleClas/PaddleX ``transform_ops``."""
    try:
        return _preprocess_from_ops(_transform_ops(config))
    except (TypeError, ValueError) as err:  # a value of the wrong kind: "abc" for a size
        raise InvalidModelError(f"{INFERENCE_YML}: {err}") from None


def _transform_ops(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """PreProcess.transform_ops (a list of one-key mappings) as {op name: its arguments}."""
    ops: dict[str, dict[str, Any]] = {}
    for op in yml_section(config, "PreProcess").get("transform_ops") or []:
        if not isinstance(op, dict) or len(op) != 1:
            raise InvalidModelError(f"{INFERENCE_YML}: each transform op must be `name: arguments`")
        ((name, args),) = op.items()
        if not isinstance(args or {}, dict):
            raise InvalidModelError(f"{INFERENCE_YML}: the arguments of {name} must be a mapping")
        ops[name] = args or {}
    return ops


def _preprocess_from_ops(ops: dict[str, dict[str, Any]]) -> PreprocessConfig:
    resize, crop, norm = (
        ops.get("ResizeImage", {}),
        ops.get("CropImage", {}),
        ops.get("NormalizeImage", {}),
    )
    crop_size = int(crop.get("size", 224))  # PaddleX's CropImage default, as for backend below
    if "resize_short" not in resize:
        raise InvalidModelError(f"{INFERENCE_YML}: only ResizeImage with resize_short is supported")
    scale = float(norm.get("scale", 1.0 / 255.0))
    if abs(scale - 1.0 / 255.0) > 1e-6:
        raise InvalidModelError(f"{INFERENCE_YML}: NormalizeImage scale {scale} is not 1/255")
    interpolation = str(resize.get("interpolation", "LINEAR")).upper()
    if interpolation not in _FROM_PADDLEX_INTERPOLATION:
        raise InvalidModelError(f"{INFERENCE_YML}: unsupported interpolation {interpolation}")
    return PreprocessConfig(
        crop_size=crop_size,
        resize_short=int(resize["resize_short"]),
        interpolation=_FROM_PADDLEX_INTERPOLATION[interpolation],
        backend=str(resize.get("backend", "cv2")),  # PaddleX's default
        mean=tuple(float(v) for v in norm.get("mean", PreprocessConfig.mean)),
        std=tuple(float(v) for v in norm.get("std", PreprocessConfig.std)),
    )


def _read_labels(folder: Path, config: dict[str, Any]) -> tuple[str, ...]:
    if (folder / LABELS_FILE).is_file():
        return read_labels_file(folder / LABELS_FILE)
    label_list = yml_section(config, "PostProcess", "Topk").get("label_list")
    if not label_list:
        raise InvalidModelError(f"{folder}: no {LABELS_FILE} and no label_list in {INFERENCE_YML}")
    # Names, not structures: a 1 KB file of YAML aliases is a list of 10^9 entries to str().
    if not isinstance(label_list, list) or not all(
        isinstance(label, (str, int, float)) for label in label_list
    ):
        raise InvalidModelError(f"{INFERENCE_YML}: label_list must be a list of class names")
    return tuple(str(label) for label in label_list)


def _read_info(path: Path) -> dict[str, Any]:
    """``model_info.json`` (ours, optional: {} without one)."""
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InvalidModelError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(info, dict):
        raise InvalidModelError(f"{path}: expected a JSON object, got {type(info).__name__}")
    return info


def load_folder(folder: str | Path, tag: str | None = None) -> ModelArtifact:
    """Read an exported model folder; missing files give one clear error."""
    folder = Path(folder)
    program = next((folder / f for f in PROGRAM_FILES if (folder / f).is_file()), None)
    missing = [
        name
        for name, present in (
            ("inference.json or inference.pdmodel", program is not None),
            (PARAMS_FILE, (folder / PARAMS_FILE).is_file()),
            (INFERENCE_YML, (folder / INFERENCE_YML).is_file()),
        )
        if not present
    ]
    if missing:
        raise ModelNotFoundError(
            f"{folder} is not an exported model folder: missing {', '.join(missing)}"
            + _paddlex2_hint(folder)
        )
    config = read_inference_yml(folder)
    info = _read_info(folder / INFO_FILE)
    return ModelArtifact(
        path=folder,
        program_file=program,
        params_file=folder / PARAMS_FILE,
        labels=_read_labels(folder, config),
        preprocess=preprocess_from_inference_yml(config),
        info=info,
        tag=tag,
    )


def _paddlex2_hint(folder: Path) -> str:
    """How to go on from a PaddleX 2 export (model.pdmodel, model.yml), which is not read: its
    model.yml describes the transforms in a schema of its own."""
    if not any((folder / name).is_file() for name in ("model.pdmodel", "model.yml")):
        return ""
    return (
        " (a PaddleX 2 export: import its checkpoint instead, `python -m train import "
        "best_model/model.pdparams --model PPLCNet_x1_0 --labels labels.txt`, or export it "
        "again with PaddleX 3)"
    )


def load_artifact(model: str | Path | ModelArtifact = DEFAULT_MODEL) -> ModelArtifact:
    """Load a model from an exported folder or a BentoML store tag (``name[:version]``)."""
    if isinstance(model, ModelArtifact):
        return model
    if Path(model).is_dir():
        return load_folder(model)
    if isinstance(model, Path) or os.sep in str(model):
        raise ModelNotFoundError(f"no model folder at {model}")
    stored = _stored(str(model))
    return load_folder(stored.path, tag=str(stored.tag))


def _stored(tag: str):
    """The store's model ``tag`` names; ModelNotFoundError when it has none, or ``tag`` is no
    store tag."""
    import bentoml  # slow to import; only needed for store tags
    from bentoml.exceptions import BentoMLException, NotFound

    try:
        return bentoml.models.get(tag)
    except NotFound:
        raise ModelNotFoundError(
            f"model {tag!r} is not in the BentoML store ({bentoml_home()}); "
            "train one with `python -m train fit DATASET` or list them with `bentoml models list`"
        ) from None
    except BentoMLException as err:
        raise ModelNotFoundError(f"invalid model tag {tag!r}: {err}") from None


# Store tags as asked (``pplcnet:latest``) → the versions they named when `bentoml serve`
# started, as JSON: recorded by the process that defines the services, whose environment every
# worker (and one restarted hours later) starts with.
PINNED_ENV = "LCNET_PINNED"


def pinned_model(tag: str):
    """A ``bentoml.models.BentoModel`` for ``tag`` at the version it names when `bentoml serve`
    starts; served from a Bento, a name or ``name:latest`` names the version the Bento packed,
    not whatever is newest in the store where it runs. Declared on a service class, it packs the
    model into a Bento; a worker, including one BentoML restarts after a newer version was
    stored, loads that version rather than resolving ``:latest`` again and serving another model
    than its siblings. If that version has left the
    store since (deleted after a rollout), such a worker starts on what ``tag`` names now, rather
    than fail at every restart; with reloading on, the workers then end on one version
    (``reload.Reloader._successor``).
    ModelNotFoundError when the store has no such model."""
    import bentoml
    from bentoml._internal.context import server_context

    tag = _packed_version_of(tag)
    pinned = json.loads(os.environ.get(PINNED_ENV) or "{}")
    if tag in pinned and server_context.worker_index is not None:
        try:
            _stored(pinned[tag])  # still there
            return bentoml.models.BentoModel(pinned[tag])
        except ModelNotFoundError:
            now = str(_stored(tag).tag)
            logging.getLogger("bentoml.lcnet").warning(
                "%s, the version this server started on, is no longer in the store: this "
                "worker starts on %s", pinned[tag], now,
            )  # fmt: skip
            return bentoml.models.BentoModel(now)
    version = str(_stored(tag).tag)
    os.environ[PINNED_ENV] = json.dumps({**pinned, tag: version})
    return bentoml.models.BentoModel(version)


def serving_bento() -> dict[str, Any] | None:
    """The ``bento.yaml`` of the Bento whose service BentoML is importing, None elsewhere:
    BentoML imports it (in `bentoml serve` and in each worker) with the Bento's ``src/`` folder
    as the working directory, next to that file."""
    here = Path.cwd()
    if here.name != "src":  # BentoML's BENTO_PROJECT_DIR_NAME
        return None
    try:
        info = yaml.safe_load((here.parent / "bento.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return info if isinstance(info, dict) else None


def packed_tags(bento: dict[str, Any], service: str | None = None) -> list[str]:
    """The model versions a Bento packed (``service``: for that service of it only), the newest
    first, as ``:latest`` named them when it was built."""
    services = bento.get("services") or []
    entries = [] if service else list(bento.get("models") or [])
    for entry in services if isinstance(services, list) else []:
        if isinstance(entry, dict) and service in (None, entry.get("name")):
            entries += entry.get("models") or []
    models = [entry for entry in entries if isinstance(entry, dict) and "tag" in entry]
    models.sort(key=lambda model: str(model.get("creation_time", "")), reverse=True)
    return [str(model["tag"]) for model in models]


def _packed_version_of(tag: str) -> str:
    """``tag``, or in a Bento, the newest version it packed of a name asked without a version (or
    as ``:latest``): what the Bento was built and tested with (an A/B pair of an old version and
    ``:latest`` packs two)."""
    name, _, version = tag.partition(":")
    bento = serving_bento() if version in ("", "latest") else None
    packed = [t for t in packed_tags(bento) if t.partition(":")[0] == name] if bento else []
    return packed[0] if packed else tag


def cache_dir() -> Path:
    """``LCNET_CACHE``, else ~/.cache/lcnet-bento: pretrained weights, engine choices."""
    return Path(os.environ.get("LCNET_CACHE") or Path.home() / ".cache" / "lcnet-bento")


def bentoml_home() -> str:
    return os.environ.get("BENTOML_HOME", str(Path.home() / "bentoml"))


def _sha256(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def write_checksums(folder: Path) -> None:
    """Record every file's SHA-256 (as ``sha256sum`` writes them) when a version is stored."""
    names = sorted(
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.is_file() and path.name not in (CHECKSUM_FILE, STORE_FILE)
    )
    lines = "".join(f"{_sha256(folder / name)}  {name}\n" for name in names)
    write_text_atomic(folder / CHECKSUM_FILE, lines)


def verify_checksums(folder: Path) -> bool:
    """Raise if a file changed since the version was stored (a truncated weights file can abort
    a process inside native code instead of raising); False when nothing was recorded."""
    recorded = folder / CHECKSUM_FILE
    if not recorded.is_file():
        return False
    for line in filter(None, read_lines(recorded)):
        digest, _, name = line.partition("  ")
        path = folder / name
        if not path.is_file() or _sha256(path) != digest:
            raise InvalidModelError(
                f"{folder.name}/{name} is missing, truncated or changed since it was stored "
                f"(checked against {CHECKSUM_FILE})"
            )
    return True
