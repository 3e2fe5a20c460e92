"""Which variant serves a model: the one named, or under ``auto`` the fastest on this machine.

``auto`` races every variant that is installed, runs on this CPU and has its file: a short,
bounded timing of batch-16 throughput at the serving thread count. Batch 16 because serving is
throughput-bound under load (the batcher forms full batches then); a lone request is fast on any
variant. Rankings differ between CPU kinds (bf16 needs avx512_bf16/AMX, INT8 gains most with
VNNI, ONNX Runtime beat OpenVINO fp32 on an AVX2-only EPYC), so no order is written down here.
The variants are timed in interleaved rounds, each keeping its median (a machine's drift hits
them alike), and a lower precision ranks above a higher one only when it is PRECISION_MARGIN
faster per step (fp32 → bf16 → int8): within the race's noise, the more precise variant serves.
The model then serves the first variant of the ranking that passed the accuracy guard (the
figures stored with it) and its self-check here; Paddle fp32, the reference, always does.

Speed depends on the network, not on its weights, so the race is cached on disk keyed by what
shapes the work — architecture, input size, classes, the variant files present — with the CPU,
the thread count and the engines' versions: a new version of the same model (a reload, a
retraining) reuses it and only checks its own accuracy. A model without a recorded architecture
(an imported folder) is keyed by its files. The race runs under a file lock: the first process
races, every other — the other serving workers, a worker BentoML restarts, a service embedding
the runner, the CLIs — waits and reads the same answer.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from .artifact import (
    DERIVED_FILES,
    INFO_FILE,
    SELF_CHECK_FILE,
    ModelArtifact,
    cache_dir,
    load_folder,
    write_text_atomic,
)
from .child import ChildFailedError, ChildStoppedError, run_python
from .engines import (
    AUTO,
    ENGINES,
    REFERENCE,
    Engine,
    Variant,
    cannot_run,
    create_engine,
    error_text,
    matching_variants,
)
from .guard import AccuracyGuardError, check, self_check, self_check_text
from .hardware import cpu_features, default_threads, resolve_threads

logger = logging.getLogger("lcnet_runner")
RACE_BATCH = 16
RACE_SECONDS = 0.4  # per variant in all, after one warm-up batch
RACE_ROUNDS = 3  # each variant once per round, in turn; at least RACE_MIN_BATCHES a round
RACE_MIN_BATCHES = 1
# How much faster a variant one precision step lower (fp32 → bf16 → int8) must be to rank
# above: one race's figures of a variant spread by ±5-10 % on a quiet machine, and a tie (bf16
# 8,238 against fp32 8,229 img/s) went to the less precise one.
PRECISION_MARGIN = 0.10
PRECISIONS = ("fp32", "bf16", "int8")  # most precise first
# Part of every race's key: bump it when what an engine does per image changes (2: OpenVINO
# normalizes inside its graph), so that races cached with the old engines are run again, or when
# the cached record changes its layout or meaning (3: a Race's fields; 4: rounds, the margin).
RACE_REVISION = 4


@dataclass
class Race:
    """What an engine race found on this machine, as it is cached: the variants that ran, in
    ranking order (``ranked``), and why the others could not."""

    images_per_s: dict[str, float]  # variant → batch-16 img/s, in ranking order (ranked())
    not_runnable: dict[str, str]  # variant → why it did not run (not installed, not this CPU...)
    batch: int
    threads: int
    cpu: dict[str, Any]
    # The model files raced: a variant that failed on other files (another version's, damaged)
    # is raced again for these.
    raced_for: list | None = None
    cached: bool = field(default=False, compare=False)  # read from the cache, not raced now

    @property
    def ranking(self) -> list[str]:
        return list(self.images_per_s)

    def with_raced_again(self, again: Race) -> Race:
        """This race with ``again``'s variants (its failures, raced again) in their places."""
        speeds = ranked({**self.images_per_s, **again.images_per_s})
        return replace(self, images_per_s=speeds, not_runnable=again.not_runnable)

    def to_json(self) -> dict[str, Any]:
        return {name: value for name, value in asdict(self).items() if name != "cached"}

    @classmethod
    def from_json(cls, record: Any) -> Race:
        """TypeError when ``record`` is not one ``to_json`` wrote."""
        if not isinstance(record, dict):
            raise TypeError(f"a race is a JSON object, not {type(record).__name__}")
        return cls(**record)

    def summary(self) -> dict[str, Any]:
        """What ``/model`` shows of it."""
        return {"batch": self.batch, "threads": self.threads, "images_per_s": self.images_per_s,
                "cpu": self.cpu, "cached": self.cached}  # fmt: skip


@dataclass
class Choice:
    """The variant chosen, its loaded engine, and why."""

    variant: Variant
    engine: Engine
    self_check: dict[str, Any] | None = None  # None: skipped (no sample, reference, skip_guard)
    race: Race | None = None  # auto among several: the race that ranked them
    skipped: dict[str, str] = field(default_factory=dict)  # variant → why it could not serve
    unchecked: bool = False  # skip_guard: neither the guard nor the self-check applied

    def describe(self) -> str:
        """One line for logs and the CLI."""
        text = f"{self.variant}"
        if self.race:
            speeds = ", ".join(f"{v} {s:.0f}" + (" (not usable)" if v in self.skipped else "")
                               for v, s in self.race.images_per_s.items())  # fmt: skip
            text += (
                f" (fastest usable here at batch {self.race.batch}, {self.race.threads} "
                f"thread(s), a lower precision only when {PRECISION_MARGIN:.0%} faster; img/s: "
                f"{speeds}; {'cached' if self.race.cached else 'raced now'})"
            )
        if self.self_check:
            text += f"; self-check passed ({self_check_text(self.self_check)})"
        elif self.unchecked:
            text += "; accuracy guard and self-check skipped (skip_guard)"
        elif self.self_check is None and self.variant != REFERENCE:
            text += "; self-check skipped (the model carries no sample)"
        return text

    def summary(self) -> dict[str, Any]:
        race = self.race.summary() if self.race else None
        return {"variant": str(self.variant), "self_check": self.self_check, "race": race,
                "not_usable": self.skipped}  # fmt: skip


def choose(
    artifact: ModelArtifact,
    engine: str = AUTO,
    precision: str = AUTO,
    threads: int | None = None,
    skip_guard: bool = False,
    race_in_child: bool = False,
    stop: threading.Event | None = None,
) -> Choice:
    """Load the requested variant; with several (``auto``), the fastest usable one here. A single
    requested variant that cannot serve raises its own error (ValueError).

    ``race_in_child`` races in a child process (servers: a worker that loaded every engine to
    race them would keep ~300 MiB of libraries it never uses, Paddle's above all); by default
    the race runs here (test doubles at the engine seam; the CLIs race in a child too, where an
    engine's native fault is that variant's failure, not the command's). ``stop`` set ends that
    child (ChildStoppedError, nothing cached): a worker that is stopping."""
    requested = matching_variants(engine, precision)
    if len(requested) == 1:
        return load(artifact, requested[0], threads, skip_guard)
    files: list = _files_of(artifact)
    with locked_cache(race_key(artifact, requested, threads)) as cache:
        race, loaded = cache.race, {}
        if race is None:
            race, loaded = _race_into(artifact, requested, threads, race_in_child, stop)
        elif race.not_runnable and race.raced_for != files:
            # A cached race's failures belong to the files that failed (another version's,
            # damaged or stale), not to the network the race is keyed by: race them again here.
            failed = [Variant.parse(name) for name in race.not_runnable]
            again, loaded = _race_into(artifact, failed, threads, race_in_child, stop)
            race = race.with_raced_again(again)
        if not race.ranking:  # raised inside: nothing is cached, the next process races
            reasons = "; ".join(f"{v}: {why}" for v, why in race.not_runnable.items())
            raise AccuracyGuardError(f"no variant of {artifact.name} runs here: {reasons}")
        cache.race = replace(race, raced_for=files)
    return _fastest_usable(artifact, cache.race, threads, skip_guard, loaded)


def _race_into(
    artifact: ModelArtifact,
    requested: list[Variant],
    threads: int | None,
    in_child: bool,
    stop: threading.Event | None = None,
) -> tuple[Race, dict[str, Engine]]:
    """Race ``requested``, here or in a child; the engines loaded here."""
    if in_child:
        return _race_in_child(artifact, requested, threads, stop), {}
    return _race(artifact, requested, threads)


def _files_of(artifact: ModelArtifact) -> list:
    """The files the engines read, as the race found them: the version that raced."""
    names = [artifact.program_file.name, artifact.params_file.name, *DERIVED_FILES]
    return [artifact.tag, str(artifact.path), _file_stats(artifact, names)]


def _file_stats(artifact: ModelArtifact, names: list[str]) -> list[list]:
    """``[name, size, mtime_ns]`` of each of the model's files ``names`` that exists."""
    stats = []
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            stat = (artifact.path / name).stat()
            stats.append([name, stat.st_size, stat.st_mtime_ns])
    return stats


def _fastest_usable(
    artifact: ModelArtifact,
    race: Race,
    threads: int | None,
    skip_guard: bool,
    loaded: dict[str, Engine],
) -> Choice:
    """The first variant of a race's ranking that passes this model's guard and self-check,
    with why every other could not serve (``loaded``: engines the race left, to reuse)."""
    skipped = dict(race.not_runnable)
    chosen = None
    for name in race.ranking:
        variant = Variant.parse(name)
        try:
            if chosen is None:
                chosen = load(artifact, variant, threads, skip_guard, loaded.get(name))
            elif not skip_guard:
                check(artifact, variant)  # slower anyway: the stored figures say enough
        except Exception as err:  # guard or self-check failed, or a file the engine refused
            skipped[name] = error_text(err)
    if chosen is None:
        reasons = "; ".join(f"{v}: {why}" for v, why in skipped.items())
        raise AccuracyGuardError(f"no usable variant of {artifact.name}: {reasons}")
    chosen.race, chosen.skipped = race, skipped
    return chosen


def _race_in_child(
    artifact: ModelArtifact,
    requested: list[Variant],
    threads: int | None,
    stop: threading.Event | None = None,
) -> Race:
    """Run ``_race`` in a fresh interpreter (``python -m lcnet_runner.choice``). A variant that
    crashes it (a native fault: OpenVINO's bf16 under ONEDNN_MAX_CPU_ISA=AVX2) is not runnable
    here, and the others race again without it: it stopped every worker from starting.
    ``stop`` set ends the child: ChildStoppedError."""
    crashed: dict[str, str] = {}
    remaining = list(requested)
    while remaining:
        order = {"path": str(artifact.path), "tag": artifact.tag, "threads": threads,
                 "requested": [str(v) for v in remaining]}  # fmt: skip
        command = ["-m", "lcnet_runner.choice", json.dumps(order)]
        try:
            printed = run_python(command, timeout_s=600, stop=stop)
        except ChildStoppedError:  # no failure of the race: raised as is (and not cached)
            raise
        except ChildProcessError as err:  # it failed, or gave no answer in time
            # Only its own fault is the variant's: a race killed from outside (the OOM killer,
            # a stop) says nothing of it, and is not cached.
            fault = isinstance(err, ChildFailedError) and err.native_fault
            culprit = _running_when_it_ended(err.stdout) if fault else None
            if culprit is None:
                raise AccuracyGuardError(f"the engine race failed: {err}") from None
            crashed[culprit] = f"crashed the engine race ({err})"
            remaining = [v for v in remaining if str(v) != culprit]
            continue
        race = Race.from_json(json.loads(printed.strip().splitlines()[-1]))
        return replace(race, not_runnable={**race.not_runnable, **crashed})
    return Race({}, crashed, RACE_BATCH, resolve_threads(threads), cpu_features())


def _running_when_it_ended(printed: str) -> str | None:
    """The variant a race child said it was running last (``_announce``), if any."""
    lines = [line for line in printed.splitlines() if line.startswith(RUNNING)]
    return lines[-1][len(RUNNING) :].strip() if lines else None


RUNNING = "racing: "  # a child's line before each variant's load and timing


def _race_here(order: dict[str, Any]) -> None:
    """The child's side: race, saying which variant runs before each native step (a crash
    names it), then print the race on the last stdout line."""
    artifact = load_folder(order["path"], tag=order["tag"])
    requested = [Variant.parse(v) for v in order["requested"]]
    race, _ = _race(artifact, requested, order["threads"], announce=_announce)
    print(json.dumps(race.to_json()))


def _announce(variant: str) -> None:
    print(f"{RUNNING}{variant}", flush=True)


def refuse_unusable(
    artifact: ModelArtifact, engine: str, precision: str, skip_guard: bool = False
) -> None:
    """Raise the one-line error a named variant would raise at load (its file and this CPU,
    then, unless skipped, its guard figures and its self-check here) without keeping anything
    loaded; ``auto`` always finds a variant."""
    requested = matching_variants(engine, precision)
    if len(requested) != 1 or requested[0] == REFERENCE:  # the reference: no figures, no check
        return
    variant = requested[0]
    if not skip_guard and (artifact.path / SELF_CHECK_FILE).is_file():
        load(artifact, variant, 1, skip_guard)  # its file, this CPU, its figures, the self-check
    elif reason := cannot_run(variant, artifact):
        raise ValueError(reason)
    elif not skip_guard:
        check(artifact, variant)


def load(
    artifact: ModelArtifact,
    variant: Variant,
    threads: int | None,
    skip_guard: bool,
    engine: Engine | None = None,
) -> Choice:
    """One variant: what this CPU can do, its stored guard figures, the engine (``engine``: one
    already loaded), then the self-check here."""
    if reason := cannot_run(variant, artifact):  # before the figures: a missing file is no
        raise ValueError(reason)  # "not checked", which skip_guard would not mend
    if not skip_guard:
        check(artifact, variant)
    engine = engine or create_engine(variant, artifact, threads)
    if skip_guard:
        return Choice(variant, engine, unchecked=True)
    return Choice(variant, engine, self_check=self_check(artifact, variant, engine.predict))


def _race(
    artifact: ModelArtifact,
    requested: list[Variant],
    threads: int | None,
    announce: Callable[[str], None] = lambda variant: None,
) -> tuple[Race, dict[str, Engine]]:
    """Time every requested variant that runs here, whatever its guard figures (speed is not
    accuracy), in RACE_ROUNDS interleaved rounds; the race and the engines it loaded."""
    crop_size = artifact.preprocess.crop_size
    batch = np.random.default_rng(0).integers(0, 256, (RACE_BATCH, crop_size, crop_size, 3),
                                              dtype=np.uint8)  # fmt: skip
    loaded, rounds, not_runnable = {}, {}, {}
    for variant in requested:
        announce(str(variant))
        try:
            engine = create_engine(variant, artifact, threads)
            engine.predict(batch)  # warm-up: kernels are built for the first batch of a shape
        # not installed, no such file, not on this CPU, a damaged file (ONNX Runtime's
        # InvalidProtobuf, OpenVINO's RuntimeError), or an engine that loads, then fails to run:
        # auto goes on with the others
        except Exception as err:
            not_runnable[str(variant)] = error_text(err)
        else:
            loaded[str(variant)], rounds[str(variant)] = engine, []
    for _ in range(RACE_ROUNDS):
        for name, engine in loaded.items():
            announce(name)
            rounds[name].append(images_per_second(engine, batch, RACE_SECONDS / RACE_ROUNDS))
    race = Race(
        images_per_s=ranked({name: round(statistics.median(r), 1) for name, r in rounds.items()}),
        not_runnable=not_runnable,
        batch=RACE_BATCH,
        threads=resolve_threads(threads),
        cpu=cpu_features(),
    )
    return race, loaded


def images_per_second(engine: Engine, batch: np.ndarray, seconds: float) -> float:
    """Throughput of an engine alone on ``batch``, bounded in time (~``seconds``)."""
    runs, start = 0, time.perf_counter()
    while runs < RACE_MIN_BATCHES or time.perf_counter() - start < seconds:
        engine.predict(batch)
        runs += 1
    return len(batch) * runs / (time.perf_counter() - start)


def ranked(speeds: dict[str, float]) -> dict[str, float]:
    """``speeds`` in ranking order: by speed, each precision step down (fp32 → bf16 → int8)
    counted PRECISION_MARGIN slower, so a lower precision ranks first only when it is that
    much faster."""

    def merit(name: str) -> float:
        steps = PRECISIONS.index(Variant.parse(name).precision)
        return speeds[name] / (1 + PRECISION_MARGIN) ** steps

    return {name: speeds[name] for name in sorted(speeds, key=merit, reverse=True)}


def race_key(artifact: ModelArtifact, requested: list[Variant], threads: int | None) -> str:
    """What the race's answer depends on: the work per image (architecture, input size, classes
    and the variant files present — or, without a recorded architecture, the model's files), the
    CPU, threads and the engines' versions. Not the weights: every version of a model shares it."""
    present = [name for name in DERIVED_FILES if (artifact.path / name).is_file()]
    architecture = artifact.info.get("architecture")
    if architecture:
        work = [architecture, artifact.preprocess.crop_size, len(artifact.labels), present]
    else:  # e.g. an imported folder: its own files
        names = [artifact.program_file.name, artifact.params_file.name, INFO_FILE, *present]
        work = [str(artifact.path.resolve()), *_file_stats(artifact, names)]
    versions = {}
    for package in ("paddlepaddle", "onnxruntime", "openvino"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    material = [work, cpu_features(), default_threads(), resolve_threads(threads),
                [str(v) for v in requested], sorted(ENGINES), versions, RACE_REVISION]  # fmt: skip
    return hashlib.sha256(json.dumps(material, default=str).encode()).hexdigest()[:24]


@dataclass
class _CachedRace:
    """The cached race for a key (None: none yet), read under the cache's lock."""

    race: Race | None


@contextmanager
def locked_cache(key: str) -> Iterator[_CachedRace]:
    """The cached race for ``key``, held under an exclusive file lock; a race the caller sets is
    written back atomically."""
    folder = _writable(cache_dir() / "engine-choice")
    path = folder / f"{key}.json"
    with open(folder / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        cached = _read_race(path)
        slot = _CachedRace(cached)
        yield slot
        if slot.race is not None and slot.race != cached:
            write_text_atomic(path, json.dumps(slot.race.to_json(), indent=2) + "\n")


def _read_race(path: Path) -> Race | None:
    """A cached race, or None (race again) when there is none or it does not read: a cache must
    never stop a model from loading (an emptied file failed every load of every worker)."""
    try:
        return replace(Race.from_json(json.loads(path.read_text(encoding="utf-8"))), cached=True)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        pass
    logger.warning("%s is no engine race: racing again", path)
    return None


def _writable(folder: Path) -> Path:
    """``folder``, or a per-user temporary one when it cannot be created (a read-only home in a
    container): the processes of one machine still share it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
    except OSError:
        pass
    fallback = Path(tempfile.gettempdir()) / f"lcnet-bento-{os.getuid()}" / "engine-choice"
    fallback.mkdir(parents=True, exist_ok=True)
    logger.warning("cannot write %s; caching engine choices in %s", folder, fallback)
    return fallback


if __name__ == "__main__":  # the child of choose(race_in_child=True)
    try:
        _race_here(json.loads(sys.argv[1]))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
