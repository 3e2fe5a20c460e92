"""``fit``: the seed's PaddleX 2 training recipe, reading top to bottom.

split lists → decode once (into RAM, or a disk cache built once and reused) → epochs of (train,
validate, checkpoint) → pick the best epoch and test it → package (export, faster variants,
accuracy guard, store). A checkpoint is a plain dict holding everything needed to resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import itertools
import json
import math
import os
import shlex
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paddle
import paddle.nn.functional as F
from tqdm import tqdm

from lcnet_runner.artifact import replaced_atomically
from lcnet_runner.hardware import resolve_threads
from lcnet_runner.preprocess import normalize

from . import distributed, pretrained
from .config import (
    CHECKPOINT,
    DERIVED,
    KEPT_ON_RESUME,
    FitConfig,
    decay_epochs,
    holds_derived,
    resumed_config,
)
from .console import log
from .data import DecodedSplit, sample_crops, train_batches
from .decoded_cache import load_split
from .evaluation import dygraph_metrics, dygraph_scores
from .export import base_info, export_inference, export_onnx, new_tag, save_to_store
from .guard import describe, guard_figures, record_guard
from .model import build_model
from .plots import confusion_matrix, plot_confusion_matrix, plot_curves
from .quantize import CALIBRATION_IMAGES, quantize_openvino, require_int8_extra
from .split import (
    SPLITS,
    DatasetError,
    counted,
    duplicated,
    duplicates_line,
    read_labels,
    read_split,
    some,
    split_changes,
    split_dataset,
    split_list,
    split_record,
    trained_on,
    unlisted_note,
)

BEST_WEIGHTS = "best.pdparams"  # weights only: loads in PaddleClas too
FIT_LOCK = ".fit.lock"  # held by the fit writing to the folder
HISTORY = "history.json"
CURVES = "curves.png"
CONFUSION = "confusion_matrix.png"
EXPORT_DIR = "inference"


@contextlib.contextmanager
def writing_to(save_dir: Path) -> Iterator[None]:
    """Holds ``save_dir`` for one `fit` (ValueError while another holds it): two runs writing to
    one folder wrote one checkpoint, export and history together, and each stored a version. A
    data-parallel rank does not take it: the `fit` that launched it holds it."""
    if "PADDLE_TRAINERS_NUM" in os.environ:
        yield
        return
    save_dir.mkdir(parents=True, exist_ok=True)
    with open(save_dir / FIT_LOCK, "w") as lock:  # released when the file closes
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(
                f"another fit is writing to {save_dir}: wait for it to end, or choose another "
                "--save-dir"
            ) from None
        yield


def learning_rate(config: FitConfig, epoch: float) -> float:
    """LR at a fractional epoch: linear warmup, then piecewise ×0.1 steps or cosine decay."""
    if epoch < config.warmup_epochs:
        return config.lr * (epoch + 1e-3) / config.warmup_epochs
    if config.schedule == "cosine":
        span = max(config.epochs - config.warmup_epochs, 1)
        return 0.5 * config.lr * (1 + math.cos(math.pi * (epoch - config.warmup_epochs) / span))
    return config.lr * 0.1 ** sum(int(epoch) >= boundary for boundary in config.lr_decay_epochs)


def save_atomic(obj: Any, path: Path) -> None:
    """A run killed mid-save leaves the previous file intact."""
    with replaced_atomically(path) as tmp:
        paddle.save(obj, str(tmp))


def prepare(dataset: Path, config: FitConfig) -> Path | None:
    """Whatever can fail before the training, done first (data-parallel: by the launcher,
    before any rank starts), cheapest first: the dataset folder, the save folder, the checkpoint
    to resume, the int8 extra, the pretrained weights (downloaded once into the cache; read once
    here, returned), the split lists (made when missing), then whether the checkpoint is this
    run's: all before the splits are decoded, which can take long.
    Ranks find all of it: N of them would write the same files at once."""
    if not dataset.is_dir():
        raise DatasetError(f"dataset directory not found: {dataset}")
    save_dir = Path(config.save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(save_dir, os.W_OK | os.X_OK):  # else found at the end of the first epoch
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(save_dir))
    if config.resume and not (save_dir / CHECKPOINT).is_file():
        raise ValueError(f"--resume: no checkpoint at {save_dir / CHECKPOINT}")
    if config.int8:
        require_int8_extra()
    weights = None if config.resume else pretrained.resolve(config.pretrained, config.model)
    if weights is not None:
        pretrained.read_state_dict(weights)  # a file that is no checkpoint, said now
    if not split_list(dataset, "train").is_file():
        log(f"{dataset} has no train_list.txt: splitting it 7:2:1 first (python -m train split "
            f"{shlex.quote(str(dataset))})")  # fmt: skip
        # Not the duplicates: load_splits finds and says them, on every run of the lists
        for line in split_dataset(dataset, seed=config.seed, find_duplicates=False).notes():
            log(line)
    if config.resume:
        path = save_dir / CHECKPOINT
        try:
            checkpoint = paddle.load(str(path))
        except Exception as err:  # paddle raises many types for a bad file
            raise ValueError(f"--resume: cannot read {path}: {err}") from None
        if not isinstance(checkpoint, dict) or not CHECKPOINT_KEYS <= checkpoint.keys():
            raise ValueError(f"--resume: {path} is not a checkpoint fit wrote (weights alone?)")
        check_same_run(checkpoint, read_labels(dataset), config, path)
        check_same_split(checkpoint.get("split"), dataset, path)
    return weights


def config_of(options: dict[str, Any]) -> FitConfig:
    """The FitConfig of the settings given (FitConfig's fields; the CLI's flags, ``fit``'s
    keywords); with ``resume``, the KEPT_ON_RESUME ones not given are the checkpoint's run's."""
    if not options.get("resume"):
        return FitConfig(**options)
    return resumed_config(options, saved_config(Path(options.get("save_dir", FitConfig.save_dir))))


def saved_config(save_dir: Path) -> dict[str, Any]:
    """The settings of the run whose checkpoint ``save_dir`` holds; {} when there is none that
    reads (prepare() says why) or it records none (an older release's)."""
    try:
        checkpoint = paddle.load(str(save_dir / CHECKPOINT))
    except Exception:  # paddle raises many types for a bad file
        return {}
    return recorded_config(checkpoint)


def recorded_config(checkpoint: Any) -> dict[str, Any]:
    """The settings ``checkpoint`` records of its run, with what an older release that did not
    record one of them used; {} when it records none (an older release's)."""
    config = checkpoint.get("config") if isinstance(checkpoint, dict) else None
    if not isinstance(config, dict):
        return {}
    return {"resize_backend": _backend_before_recorded(config), **config}


def _backend_before_recorded(config: dict[str, Any]) -> str:
    """The resize backend of a run from before resize_backend was recorded (885e533), which a
    resume of it otherwise took from today's default, unsaid. OpenCV became the default a few
    commits earlier (7cf4265), shortly before ram_cache_mb was first recorded (9ad82bb): a run
    that records ram_cache_mb resized with OpenCV; one that does not, most likely with PIL."""
    return "cv2" if "ram_cache_mb" in config else "pil"


# What every checkpoint holds since the first release (TrainingState.restore reads them).
CHECKPOINT_KEYS = {"model", "optimizer", "epoch", "best", "history"}

# What shapes the training itself, and so what a resume may change knowingly (said, not refused:
# a higher --epochs is how a finished run trains on).
TRAINING_SETTINGS = (
    "epochs", "batch_size", "lr", "schedule", "warmup_epochs", "momentum", "weight_decay",
    "crop_scale", "hflip", "seed", *KEPT_ON_RESUME,
)  # fmt: skip


def changed_settings(saved: dict[str, Any], config: FitConfig) -> str:
    """``--lr 0.5 (that run: 0.1), ...`` for the training settings that differ from a
    checkpoint's; "" when none does (or an older checkpoint did not record them). A DERIVED
    setting (decay epochs, resize-short) only when one run named it: derived on both sides, it
    follows its source (--epochs, --input-size), which is said."""
    now = dataclasses.asdict(config)
    follows = {
        name
        for name, (source, _, _) in DERIVED.items()
        if {name, source} <= saved.keys() and all(holds_derived(run, name) for run in (saved, now))
    }
    if config.schedule == "cosine":  # decays without them
        follows.add("lr_decay_epochs")
    changed = [
        f"--{key.replace('_', '-')} {_flag_value(now[key])} (that run: {_flag_value(saved[key])})"
        for key in TRAINING_SETTINGS
        if key in saved and key not in follows and _flag_value(saved[key]) != _flag_value(now[key])
    ]
    return ", ".join(changed)


def schedule_note(saved: dict[str, Any], config: FitConfig) -> str:
    """The line saying where a resume decays the learning rate when that is not where that run
    did, unasked: decay epochs kept where --epochs alone would derive others (an older release's
    default, or decay epochs that run named), or derived anew from a new --epochs (which can
    raise the rate again: a finished run's last epoch decayed, the next one not yet); "" else."""
    if config.schedule != "piecewise" or "lr_decay_epochs" not in saved:
        return ""
    now, then = _flag_value(config.lr_decay_epochs), _flag_value(saved["lr_decay_epochs"])
    derived = decay_epochs(config.epochs)
    if now == then and config.lr_decay_epochs != derived:
        return (f"keeping that run's learning-rate decay at epochs {now} (--epochs "
                f"{config.epochs} alone derives {_flag_value(derived)}; --lr-decay-epochs sets "
                "others)")  # fmt: skip
    if (
        now != then
        and config.lr_decay_epochs == derived
        and holds_derived(saved, "lr_decay_epochs")
    ):
        return (f"learning-rate decay follows --epochs {config.epochs}: at epochs {now} (that "
                f"run: {then}; --lr-decay-epochs {then} keeps that run's)")  # fmt: skip
    return ""  # as that run's, or given: said as a change


def _flag_value(value: Any) -> str:
    """A setting as its flag takes it (a checkpoint keeps tuples as lists)."""
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def load_splits(
    dataset: Path, config: FitConfig, rank: distributed.Rank
) -> tuple[list[str], dict[str, DecodedSplit]]:
    """Read (or first create) the split lists and load each non-empty split decoded once (a
    disk cache is built by the first rank on this machine, the others wait and reuse it): each
    rank its shard of the train split; val and test only on rank 0, which evaluates."""
    labels = read_labels(dataset)
    if rank.main and (note := unlisted_note(dataset)):
        log(note)
    listed = {
        name: read_split(dataset, name) if split_list(dataset, name).is_file() else []
        for name in (SPLITS if rank.main else ["train"])
    }
    if rank.main and (note := duplicates_line(duplicated(dataset, labels, listed))):
        log(note)
    workers = resolve_threads(config.workers)
    splits = {}
    for name, samples in listed.items():
        if not samples:
            continue
        split = load_split(samples, config.preprocess, config.cache, name=name, dataset=dataset,
                           workers=workers, builder=distributed.local_main(rank))  # fmt: skip
        if split.skipped:
            log(f"{name}: skipped {counted(split.skipped, 'image')} missing or unreadable: "
                f"{some(split.skipped)}")  # fmt: skip
        if name == "train":
            _refuse_untrained_classes(split, labels, dataset)
        if name == "train" and rank.world > 1:
            split = split.subset(distributed.shard(range(len(split)), rank))
            if not rank.main:  # rank 0's console shows what one process would, no more
                note = (f"rank {rank.index}/{rank.world}: {len(split)} training images, "
                        f"{split.decoded} decoded by this rank")  # fmt: skip
                print(note, file=sys.stderr)
        if len(split) or name == "train":  # a val/test split left with nothing: as if absent
            splits[name] = split
    if not splits.get("train"):
        raise ValueError(f"{dataset}: the train split has no readable images")
    return labels, splits


def _refuse_untrained_classes(train: DecodedSplit, labels: list[str], dataset: Path) -> None:
    """ValueError when a class has no training image left (its files gone or broken since the
    split): the model would answer it at random, yet be stored as knowing it."""
    trained = set(np.unique(train.labels).tolist())
    if untrained := [label for i, label in enumerate(labels) if i not in trained]:
        raise ValueError(
            f"no training image left for {counted(untrained, 'class', 'classes')}: "
            f"{some(untrained)}; split the folder again (python -m train split "
            f"{shlex.quote(str(dataset))})"
        )


@dataclass
class TrainingState:
    """What the epochs change. ``checkpoint``/``restore`` map it to the plain dict saved as
    last.pdckpt, whose keys stay those of the first release so that old checkpoints resume."""

    model: paddle.nn.Layer
    optimizer: paddle.optimizer.Optimizer
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per finished epoch
    epochs_done: int = 0
    best_epoch: int = -1  # 0-based, as in checkpoints
    best_score: float = -math.inf  # val top-1, or the epoch index when there is no val split
    # The best epoch's weights (copies), saved inside last.pdckpt: one atomic file says which
    # epoch was best and holds its weights, so a run killed between writing the checkpoint and
    # best.pdparams cannot store one epoch's weights with another epoch's metrics.
    best_weights: dict[str, np.ndarray] | None = None
    # Training time: what the runs this one resumes spent, and when this one started.
    earlier_s: float = 0.0
    started: float = field(default_factory=time.time)
    # The split lists this run trains on (split.split_record): a resume checks them.
    split: dict[str, Any] = field(default_factory=dict)

    @property
    def training_s(self) -> float:
        return self.earlier_s + time.time() - self.started

    def checkpoint(self, labels: list[str], config: FitConfig) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epochs_done - 1,
            "best": {
                "score": self.best_score,
                "epoch": self.best_epoch,
                "weights": self.best_weights,
            },  # fmt: skip
            "history": self.history,
            "labels": labels,
            "config": dataclasses.asdict(config),
            "training_s": self.training_s,
            "split": self.split,
        }

    def restore(self, checkpoint: dict[str, Any]) -> None:
        self.model.set_state_dict(checkpoint["model"])
        self.optimizer.set_state_dict(checkpoint["optimizer"])
        self.history = checkpoint["history"]
        self.epochs_done = checkpoint["epoch"] + 1
        self.best_score = checkpoint["best"]["score"]
        self.best_epoch = checkpoint["best"]["epoch"]
        self.best_weights = checkpoint["best"].get("weights")  # None: an older release's
        self.earlier_s = checkpoint.get("training_s", 0.0)
        self.split = checkpoint.get("split") or {}  # what the runs before this one trained on

    def keep_best(self, epoch: int, score: float) -> None:
        self.best_score, self.best_epoch = score, epoch
        self.best_weights = {name: t.numpy() for name, t in self.model.state_dict().items()}


def check_same_run(
    checkpoint: dict[str, Any], labels: list[str], config: FitConfig, path: Path
) -> None:
    """ValueError unless ``checkpoint`` has this run's classes (in label-index order) and
    architecture: otherwise a resume trains on a shuffled class mapping or fails inside Paddle."""
    fix = "use another --save-dir, or leave out --resume to start over"
    saved_model = recorded_config(checkpoint).get("model", config.model)
    if saved_model != config.model:
        raise ValueError(
            f"--resume: {path} is a {saved_model} checkpoint, not {config.model}; {fix}"
        )
    saved = list(checkpoint.get("labels", labels))
    if saved != labels:
        changes = label_changes(saved, labels)
        raise ValueError(f"--resume: {path} was trained on other classes ({changes}); {fix}")


def check_same_split(saved: dict[str, Any] | None, dataset: Path, path: Path) -> None:
    """ValueError when a val or test image of the lists now was in the train list of the run
    ``path`` holds: its scores would be measured on images it trained on (a `split --reshuffle`
    since). Any other change of the lists is said: earlier epochs were scored on the old ones."""
    if not saved:
        log(f"{path} records no split (an older release's checkpoint): whether the val and test "
            "images stayed out of that run's training could not be checked")  # fmt: skip
        return
    if leaked := trained_on(saved, dataset):
        raise ValueError(
            f"--resume: {counted(leaked, 'val or test image')} of {dataset} trained in the run "
            f"of {path}: {some(leaked)}; its scores would flatter it. Restore that run's split "
            "lists, or leave out --resume to start over"
        )
    if changes := split_changes(saved, dataset):
        log(f"resuming on split lists changed since that run ({'; '.join(changes)}): its "
            "earlier epochs were trained and scored on the old ones")  # fmt: skip


def label_changes(saved: list[str], current: list[str]) -> str:
    """What differs between a checkpoint's classes and the dataset's, for one error line
    (repr: a name may hold spaces or line separators)."""
    added = [name for name in current if name not in saved]
    removed = [name for name in saved if name not in current]
    if not added and not removed:
        return "the same names in another order"
    changes = (("new", added), ("gone", removed))
    return "; ".join(f"{what}: {_names(names)}" for what, names in changes if names)


def _names(names: list[str], shown: int = 5) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(map(repr, names[:shown])) + more


def initial_state(config: FitConfig, labels: list[str], weights: Path | None) -> TrainingState:
    """A new model (with ``weights`` when given), or with --resume the last checkpoint's state."""
    model = build_model(config.model, num_classes=len(labels))
    optimizer = paddle.optimizer.Momentum(
        learning_rate=config.lr,
        momentum=config.momentum,
        parameters=model.parameters(),
        weight_decay=paddle.regularizer.L2Decay(config.weight_decay),
    )
    state = TrainingState(model, optimizer)
    path = Path(config.save_dir) / CHECKPOINT
    if config.resume:  # prepare() found the checkpoint and checked it is this run's
        checkpoint = paddle.load(str(path))
        state.restore(checkpoint)
        log(f"resuming from epoch {state.epochs_done} of {path}")
        saved = recorded_config(checkpoint)
        if changed := changed_settings(saved, config):
            log(f"resuming with other settings than that run: {changed}")
        if note := schedule_note(saved, config):
            log(note)
        if saved and "resize_backend" not in checkpoint["config"]:
            log(f"that run's resize backend is not recorded (an older release's): going on with "
                f"{config.resize_backend}; --resize-backend sets the other")  # fmt: skip
        if state.epochs_done >= config.epochs:  # e.g. stopped while exporting: store it now
            log(f"that run trained {state.epochs_done} epochs, --epochs {config.epochs}: "
                "nothing to train, it is only exported and stored "
                "(a higher --epochs trains on)")  # fmt: skip
    elif path.is_file():
        log(f"{path.parent} holds an earlier run's checkpoint, which this run replaces at the "
            "end of its first epoch (--resume continues that run instead)")  # fmt: skip
    if weights is not None:
        report = pretrained.load_weights(model, weights)
        skipped = ", ".join(report.skipped) or "none"
        log(f"loaded {report.loaded} tensors from {weights}; re-initialised: {skipped}")
    return state


def train_one_epoch(
    model: paddle.nn.Layer,
    optimizer: paddle.optimizer.Optimizer,
    split: DecodedSplit,
    config: FitConfig,
    epoch: int,
    rng: np.random.Generator,
    rank: distributed.Rank = distributed.SINGLE,
) -> dict[str, float]:
    """One pass over this rank's data; loss, top-1 and images/s are summed over all ranks."""
    model.train()
    batch_size = max(1, config.batch_size // rank.world)  # the global batch stays the same
    # Every rank must take the same number of steps (each one all-reduces gradients).
    steps = int(distributed.all_reduce([math.ceil(len(split) / batch_size)], rank, "min")[0])
    batches = train_batches(split, config.augment, config.preprocess, batch_size, rng)
    loss_sum, correct, seen, start = 0.0, 0, 0, time.perf_counter()
    progress = tqdm(
        itertools.islice(batches, steps), total=steps, desc=f"epoch {epoch + 1}",
        disable=None if rank.main else True, leave=False,
    )  # fmt: skip
    for step, (crops, targets) in enumerate(progress):
        optimizer.set_lr(learning_rate(config, epoch + step / steps))
        logits = model(paddle.to_tensor(normalize(crops, config.preprocess)))
        loss = F.cross_entropy(logits, paddle.to_tensor(targets))
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        loss_sum += float(loss) * len(targets)
        correct += int((logits.argmax(axis=1).numpy() == targets).sum())
        seen += len(targets)
        progress.set_postfix(loss=f"{loss_sum / seen:.3f}")
    elapsed = time.perf_counter() - start
    loss_sum, correct, seen = distributed.all_reduce([loss_sum, correct, seen], rank)
    if not math.isfinite(loss_sum):  # every rank sees the same sum, so all of them stop
        raise ValueError(f"training diverged (loss {loss_sum / seen}); try a lower --lr")
    return {"loss": loss_sum / seen, "top1": correct / seen, "images_per_s": seen / elapsed}


def seed_epoch(seed: int, rank: int, epoch: int) -> np.random.Generator:
    """One epoch's randomness, from (seed, rank, epoch) alone: the order and augmentation draws
    (returned) and Paddle's generator, which the head's dropout draws from (seeded here). Every
    epoch draws afresh, and a run resumed at epoch k trains it as an uninterrupted run does: a
    stream seeded once per run could not be picked up where a checkpoint left it."""
    augmentation, dropout = np.random.SeedSequence([seed, rank, epoch]).spawn(2)
    paddle.seed(int(dropout.generate_state(1)[0]))
    return np.random.default_rng(augmentation)


def train(
    state: TrainingState,
    splits: dict[str, DecodedSplit],
    labels: list[str],
    config: FitConfig,
    rank: distributed.Rank,
) -> None:
    """Epochs of (train on every rank, then on rank 0 validate, checkpoint and log) until the
    last one or an early stop."""
    network = paddle.DataParallel(state.model) if rank.world > 1 else state.model
    if rank.main and "val" not in splits:
        log("no val images (val_list.txt lists none readable): the last epoch is kept")
    for epoch in range(state.epochs_done, config.epochs):
        rng = seed_epoch(config.seed, rank.index, epoch)
        stats = train_one_epoch(network, state.optimizer, splits["train"], config, epoch, rng, rank)
        # Rank 0 alone validates and checkpoints; its early-stop decision reaches every rank.
        stop = rank.main and end_of_epoch(state, epoch, stats, splits.get("val"), labels, config)
        if distributed.broadcast_flag(stop, rank):
            break


def _share(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def end_of_epoch(
    state: TrainingState,
    epoch: int,
    stats: dict[str, float],
    val_split: DecodedSplit | None,
    labels: list[str],
    config: FitConfig,
) -> bool:
    """Rank 0: validate, keep the best weights, checkpoint, log; True to stop early."""
    save_dir = Path(config.save_dir)
    val = dygraph_metrics(state.model, val_split, labels, config.preprocess)
    row = {
        "epoch": epoch + 1,
        "lr": learning_rate(config, epoch),
        "train_loss": stats["loss"],
        "train_top1": stats["top1"],
        "val_top1": val.get("top1"),
        "val_top5": val.get("top5"),
        "images_per_s": stats["images_per_s"],
    }
    state.history.append(row)
    state.epochs_done = epoch + 1
    # Without a validation split every epoch "improves", so the last one is kept.
    score = val["top1"] if val else epoch
    improved = score > state.best_score
    if improved:
        state.keep_best(epoch, score)
    save_atomic(state.checkpoint(labels, config), save_dir / CHECKPOINT)
    if improved:  # after the checkpoint, which pick_best trusts over this file
        save_atomic(state.model.state_dict(), save_dir / BEST_WEIGHTS)
    log(
        f"epoch {epoch + 1}/{config.epochs}  lr {row['lr']:.5f}  loss {stats['loss']:.4f}  "
        f"train_top1 {stats['top1']:.3f}  val_top1 {_share(row['val_top1'])}  "
        f"val_top5 {_share(row['val_top5'])}  {stats['images_per_s']:.0f} img/s"
    )
    patience = config.early_stop_patience
    if patience and epoch - state.best_epoch >= patience:
        log(f"early stop: no better val top-1 for {patience} epochs")
        return True
    return False


def pick_best(
    state: TrainingState, splits: dict[str, DecodedSplit], labels: list[str], config: FitConfig
) -> dict[str, Any]:
    """Rank 0 after the epochs: write history.json, bring back the best epoch's weights and
    measure them on the test split (the metrics; {} without a test split)."""
    save_dir = Path(config.save_dir)
    (save_dir / HISTORY).write_text(json.dumps(state.history, indent=2) + "\n")
    if state.best_weights is None:  # resumed from an older release's checkpoint
        state.model.set_state_dict(paddle.load(str(save_dir / BEST_WEIGHTS)))
    else:  # and best.pdparams made to agree, had a run been killed before writing it
        state.model.set_state_dict(state.best_weights)
        save_atomic(state.model.state_dict(), save_dir / BEST_WEIGHTS)
    return dygraph_metrics(state.model, splits.get("test"), labels, config.preprocess)


def model_info(
    config: FitConfig,
    dataset: Path,
    labels: list[str],
    state: TrainingState,
    train_images: int,
    test: dict[str, Any],
    seconds: float,
) -> dict[str, Any]:
    """What is stored with the model: store labels, metadata, model_info.json."""
    history = state.history  # every epoch, resumed runs included
    best = history[state.best_epoch]
    return {
        **base_info(config.model, labels, config.preprocess),
        "dataset": dataset.resolve().name,
        "val_top1": best["val_top1"],
        "val_top5": best["val_top5"],
        "test_top1": test.get("top1"),
        "test_top5": test.get("top5"),
        "epochs": history[-1]["epoch"],
        "best_epoch": state.best_epoch + 1,
        "train_images": train_images,
        "pretrained": config.pretrained,
        "crop_scale": list(config.crop_scale),
        "hflip": config.hflip,
        "training_time_s": round(seconds, 1),
    }


def write_plots(
    model: paddle.nn.Layer,
    splits: dict[str, DecodedSplit],
    labels: list[str],
    history: list[dict[str, Any]],
    config: FitConfig,
    out_dir: Path,
) -> list[Path]:
    """curves.png, and confusion_matrix.png on the test split (val when there is no test)."""
    files = [plot_curves(history, out_dir / CURVES)]
    name = "test" if "test" in splits else "val" if "val" in splits else None
    if name:
        split = splits[name]
        predicted = dygraph_scores(model, split, config.preprocess).argmax(axis=1)
        counts = confusion_matrix(split.labels, predicted, len(labels))
        title = f"{config.name}: {name} split"
        files.append(plot_confusion_matrix(counts, labels, out_dir / CONFUSION, title=title))
    return files


def export(
    state: TrainingState,
    splits: dict[str, DecodedSplit],
    labels: list[str],
    config: FitConfig,
    info: dict[str, Any],
) -> Path:
    """The inference folder of the best weights, with the plots and history.json."""
    save_dir = Path(config.save_dir)
    # Nothing an earlier run left in this save dir's export (its self-check sample, made with
    # its weights; its confusion matrix) may be stored with this version.
    shutil.rmtree(save_dir / EXPORT_DIR, ignore_errors=True)
    folder = export_inference(
        state.model,
        save_dir / EXPORT_DIR,
        architecture=config.model,
        labels=labels,
        preprocess=config.preprocess,
        info=info,
    )
    # Curves, confusion matrix and history travel with the model version.
    plots = write_plots(state.model, splits, labels, state.history, config, save_dir)
    for path in [*plots, save_dir / HISTORY]:
        shutil.copy(path, folder / path.name)
    return folder


def add_variants(folder: Path, train_split: DecodedSplit, config: FitConfig) -> None:
    """ONNX (and with --int8 an INT8 OpenVINO model) next to the Paddle one, stored with the
    version so serving never converts."""
    if export_onnx(folder):
        log(f"wrote {folder / 'inference.onnx'} for the onnxruntime and openvino engines")
    if config.int8:
        crops = sample_crops(train_split, CALIBRATION_IMAGES, config.input_size)
        log(f"wrote {quantize_openvino(folder, crops)} (calibrated on {len(crops)} images)")


def package(
    state: TrainingState,
    splits: dict[str, DecodedSplit],
    labels: list[str],
    config: FitConfig,
    info: dict[str, Any],
    dataset: Path,
) -> dict[str, Any]:
    """Export, add the variants, measure them against Paddle fp32 on ``dataset``'s val split and
    store the version; the summary ``fit`` returns."""
    folder = export(state, splits, labels, config, info)
    add_variants(folder, splits["train"], config)
    # The guard's advice (make the INT8 variant with `quantize ...`) names the stored version,
    # which the user passes to quantize, verify or predict, not the save dir's export folder.
    tag = new_tag(config.name)
    if "val" in splits:  # which engines/precisions may serve it (lcnet_runner.guard)
        threads = config.threads or None
        figures = guard_figures(folder, splits["val"], "val", threads, tag, dataset)
        info = record_guard(folder, figures)
        log(describe(figures))
    save_to_store(folder, tag, info)
    summary_keys = ("architecture", "val_top1", "test_top1", "epochs", "training_time_s")
    return {"tag": tag, **{k: info[k] for k in summary_keys}, "export_dir": str(folder)}


def fit(dataset: str | Path, config: FitConfig | None = None, **overrides: Any) -> dict[str, Any]:
    """Train, evaluate, export and store a PP-LCNet; returns the summary printed as JSON.
    ``overrides`` are FitConfig's fields; with ``resume=True`` and no ``config``, the input size
    and resize settings not among them are the resumed run's (``config_of``).

    Started by ``paddle.distributed.launch`` it trains data-parallel; only rank 0 evaluates,
    checkpoints, exports and stores (the other ranks return ``{"rank": i}``).
    """
    config = config.changed(**overrides) if config is not None else config_of(overrides)
    dataset = Path(dataset)
    with writing_to(Path(config.save_dir)):
        return fit_prepared(dataset, config, prepare(dataset, config))


def fit_prepared(dataset: Path, config: FitConfig, weights: Path | None) -> dict[str, Any]:
    """``fit`` once ``prepare`` returned ``weights``, in the process holding the save folder (the
    CLI prepares once, before it decides to launch ranks; a rank finds the launcher's work)."""
    started = time.time()
    rank = distributed.init()
    paddle.seed(config.seed)  # the same initial weights on every rank
    paddle.base.core.set_num_threads(resolve_threads(config.threads))
    labels, splits = load_splits(dataset, config, rank)
    state = initial_state(config, labels, weights)
    state.started = started
    state.split = split_record(dataset, earlier=state.split) if rank.main else {}

    train(state, splits, labels, config, rank)
    if not rank.main:
        return {"rank": rank.index}
    test = pick_best(state, splits, labels, config)
    train_images = splits["train"].whole or len(splits["train"])  # a shard's: its split's
    info = model_info(config, dataset, labels, state, train_images, test, state.training_s)
    return package(state, splits, labels, config, info, dataset)
