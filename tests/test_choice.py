"""Which variant serves, decided on the machine that serves: the self-check refuses a variant
that answers wrong on this CPU, and ``auto`` races what is left, once for every process."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import run_cli

from lcnet_runner import Predictor
from lcnet_runner.artifact import SELF_CHECK_FILE, load_folder, write_info
from lcnet_runner.child import ChildStoppedError
from lcnet_runner.choice import PRECISION_MARGIN, _race, choose, race_key, ranked
from lcnet_runner.engines import (
    ENGINES,
    REFERENCE,
    OnnxRuntimeEngine,
    OpenVinoEngine,
    PaddleEngine,
    Variant,
    matching_variants,
)
from lcnet_runner.guard import GUARD_KEY, AccuracyGuardError, self_check_figures, self_check_text

PASS = {"top1": 0.9, "top1_drop_pt": 0.0, "agreement": 1.0, "max_score_diff": 0.0, "passed": True}
FAIL = {"top1": 0.8, "top1_drop_pt": 10.0, "agreement": 0.9, "max_score_diff": 0.5, "passed": False}
PASSED = {"paddle/fp32", "onnxruntime/fp32", "openvino/fp32"}  # in ``folder``, the reference too


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A race is shared by every model of the same architecture: each test races afresh (some
    replace engines with doubles, whose ranking must not reach the others)."""
    monkeypatch.setenv("LCNET_CACHE", str(tmp_path / "cache"))


def set_guard(folder: Path, variants: dict[str, dict]) -> None:
    info = load_folder(folder).info
    write_info(folder, {**info, GUARD_KEY: {**info[GUARD_KEY], "variants": variants}})


@pytest.fixture
def folder(trained: dict, tmp_path: Path) -> Path:
    """A copy of the trained export where onnxruntime and openvino fp32 passed the guard."""
    copy = tmp_path / "model"
    shutil.copytree(trained["export_dir"], copy)
    set_guard(copy, {"onnxruntime/fp32": PASS, "openvino/fp32": PASS})
    return copy


class WrongOnThisCpu(OnnxRuntimeEngine):
    """The seam a CPU's kernels sit behind: answers shifted by one class, as a saturating INT8
    kernel on a CPU without VNNI would scramble them."""

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return np.roll(super().predict(batch), 1, axis=1)


def slowed(engine: type) -> type:
    """``engine``, 50 ms slower per batch: the tiny test model runs thousands of images/s, so
    a slowed engine loses every race."""

    class Slow(engine):
        def predict(self, batch: np.ndarray) -> np.ndarray:
            time.sleep(0.05)
            return super().predict(batch)

    return Slow


def test_fit_stores_a_self_check_sample(trained: dict) -> None:
    with np.load(Path(trained["export_dir"]) / SELF_CHECK_FILE) as sample:
        crops, probs = sample["crops"], sample["probs"]
    assert crops.dtype == np.uint8 and crops.shape[1:] == (32, 32, 3) and len(crops) == len(probs)
    reference = Predictor(trained["export_dir"], engine="paddle", precision="fp32", threads=1)
    np.testing.assert_allclose(reference.infer(crops), probs, atol=1e-5)


def test_self_check_bar_ignores_near_ties_but_not_flips() -> None:
    reference = np.array([[0.9, 0.1], [0.8, 0.2], [0.52, 0.48], [0.1, 0.9]])
    near_tie_flipped = np.array([[0.9, 0.1], [0.8, 0.2], [0.47, 0.53], [0.1, 0.9]])
    figures = self_check_figures(reference, near_tie_flipped)
    assert (figures["clear"], figures["agreement"], figures["passed"]) == (3, 1.0, True)
    clear_flipped = reference[:, ::-1]
    assert self_check_figures(reference, clear_flipped)["agreement"] == 0.0
    assert not self_check_figures(reference, clear_flipped)["passed"]
    drifted = reference + np.array([[-0.1, 0.1]])  # same top-1, scores 0.1 off
    assert not self_check_figures(reference, drifted)["passed"]
    # no clear image: top-1 is not compared (it read 100 %), the scores still are
    flat = np.array([[0.55, 0.45], [0.45, 0.55]])
    unclear = self_check_figures(flat, flat + np.array([[-0.02, 0.02]]))
    assert (unclear["clear"], unclear["agreement"], unclear["passed"]) == (0, None, True)
    assert self_check_text(unclear).startswith("top-1 not compared: none of 2 sample images")
    assert not self_check_figures(flat, flat + np.array([[0.1, -0.1]]))["passed"]


def test_a_variant_wrong_on_this_cpu_is_refused_and_auto_falls_back(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(ENGINES, "onnxruntime", WrongOnThisCpu)
    # stored figures say passed, yet the sample disagrees here
    with pytest.raises(AccuracyGuardError, match="onnxruntime/fp32 fails its self-check"):
        Predictor(folder, engine="onnxruntime", precision="fp32", threads=1)
    for name, engine in (("paddle", PaddleEngine), ("openvino", OpenVinoEngine)):
        monkeypatch.setitem(ENGINES, name, slowed(engine))
    auto = Predictor(folder, threads=1)
    assert list(auto.choice.race.images_per_s)[0] == "onnxruntime/fp32"  # fastest, yet wrong
    assert str(auto.variant) != "onnxruntime/fp32"
    assert "fails its self-check" in auto.choice.skipped["onnxruntime/fp32"]
    assert auto.choice.self_check is None or auto.choice.self_check["passed"]
    # accepted on purpose: skip_guard skips both checks
    forced = Predictor(folder, engine="onnxruntime", precision="fp32", threads=1, skip_guard=True)
    assert forced.choice.self_check is None


def test_auto_skips_variants_with_damaged_guard_data(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Malformed figures or a damaged sample make that variant unusable; Paddle fp32, the
    reference, still serves (these crashed ``auto`` with KeyError / TypeError / BadZipFile)."""
    monkeypatch.setitem(ENGINES, "paddle", slowed(PaddleEngine))  # the others are tried first
    malformed = {
        "onnxruntime/fp32": {"passed": False},
        "openvino/fp32": {**PASS, "agreement": None},
    }
    set_guard(folder, malformed)
    choice = Predictor(folder, threads=1).choice
    assert choice.variant == REFERENCE
    for name in ("onnxruntime/fp32", "openvino/fp32"):
        assert "cannot be checked" in choice.skipped[name]
    set_guard(folder, {"onnxruntime/fp32": PASS, "openvino/fp32": PASS})
    whole = (folder / SELF_CHECK_FILE).read_bytes()
    (folder / SELF_CHECK_FILE).write_bytes(whole[: len(whole) // 2])
    choice = Predictor(folder, threads=1).choice
    assert choice.variant == REFERENCE
    assert f"{SELF_CHECK_FILE} is damaged" in choice.skipped["onnxruntime/fp32"]


def test_auto_skips_an_engine_that_refuses_a_damaged_file(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A truncated inference.onnx in a folder without checksums: ONNX Runtime raises its own
    InvalidProtobuf (and OpenVINO, which reads the ONNX file when there is no IR, a RuntimeError),
    which crashed ``auto``; the variant is now not runnable, and another serves."""
    onnx = folder / "inference.onnx"
    onnx.write_bytes(onnx.read_bytes()[:5000])
    monkeypatch.setitem(ENGINES, "paddle", slowed(PaddleEngine))  # the others are tried first
    predictor = Predictor(folder, threads=1)
    assert predictor.variant.engine != "onnxruntime"
    assert "InvalidProtobuf" in predictor.choice.skipped["onnxruntime/fp32"]


def test_the_slowest_variant_is_never_chosen(folder: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(ENGINES, "openvino", slowed(OpenVinoEngine))
    choice = Predictor(folder, threads=1).choice
    speeds = choice.race.images_per_s
    assert PASSED <= set(speeds)
    assert str(choice.variant) == max(speeds, key=speeds.get) != "openvino/fp32"
    assert choice.race.cached is False and choice.race.threads == 1


def test_a_model_without_a_sample_skips_its_self_check(folder: Path) -> None:
    (folder / SELF_CHECK_FILE).unlink()
    predictor = Predictor(folder, engine="openvino", precision="fp32", threads=1)
    assert predictor.choice.self_check is None
    assert "self-check skipped" in predictor.choice.describe()


CHOOSE = """
import sys
from lcnet_runner import Predictor
print(Predictor(sys.argv[1], threads=1).choice.describe())
"""


def test_every_process_serves_the_same_choice(folder: Path, tmp_path: Path) -> None:
    """Two processes starting at once (two workers): one races, the other reads its answer."""
    env = {**os.environ, "LCNET_CACHE": str(tmp_path / "cache")}
    procs = [
        subprocess.Popen([sys.executable, "-c", CHOOSE, str(folder)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]  # fmt: skip
    lines = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs), lines
    chosen = {line.split(" ")[0] for line in lines}
    assert len(chosen) == 1, lines
    assert sorted("raced now" in line for line in lines) == [False, True], lines
    (cached,) = (tmp_path / "cache" / "engine-choice").glob("*.json")
    ranking = list(json.loads(cached.read_text())["images_per_s"])
    assert chosen.pop() == next(v for v in ranking if v in PASSED) and str(REFERENCE) in ranking


RUNNER = """
import sys
from lcnet_runner.runner import LCNetRunner
runner = LCNetRunner.from_model(sys.argv[1], threads=1)
print(runner.predictor.variant, "paddle" in sys.modules, runner.predictor.choice.race.cached)
"""


def test_a_serving_runner_races_in_a_child_and_keeps_only_its_engine(
    folder: Path, tmp_path: Path
) -> None:
    """The race loads every variant (Paddle's libraries: ~300 MiB that never leave a process);
    a runner races in a child process, so it holds the winner's engine alone."""
    env = {**os.environ, "LCNET_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", RUNNER, str(folder)], env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    variant, paddle_loaded, cached = result.stdout.split()
    assert paddle_loaded == str(variant == "paddle/fp32") and cached == "False"
    (record,) = (tmp_path / "cache" / "engine-choice").glob("*.json")
    ranking = list(json.loads(record.read_text())["images_per_s"])
    assert variant == next(v for v in ranking if v in PASSED) and PASSED <= set(ranking)


def test_a_new_version_reuses_the_race_and_checks_its_own_accuracy(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Speed depends on the network, not its weights: a new version of the same model (a
    reload, a retraining) serves without racing again, and what it may serve is its own guard's
    call."""
    monkeypatch.setitem(ENGINES, "paddle", slowed(PaddleEngine))  # the winner is not the reference
    first = Predictor(folder, threads=1).choice
    winner = str(first.variant)
    assert first.race.cached is False and winner != str(REFERENCE)
    version_2 = tmp_path / "version-2"  # other files, elsewhere: a new version in the store
    shutil.copytree(folder, version_2)
    set_guard(version_2, {"onnxruntime/fp32": PASS, "openvino/fp32": PASS, winner: FAIL})
    second = Predictor(version_2, threads=1).choice
    assert second.race.cached is True
    assert second.race.images_per_s == first.race.images_per_s
    assert str(second.variant) != winner
    assert "fails the accuracy guard" in second.skipped[winner]
    assert re.search(rf"{re.escape(winner)} \d+ \(not usable\)", second.describe())  # in the log


@pytest.mark.parametrize("damage", ["", "{", "[]", '{"ranking": []}'])
def test_a_cached_race_that_does_not_read_is_run_again(
    folder: Path, tmp_path: Path, damage: str
) -> None:
    """An emptied or damaged race file (a crash on some file systems) failed every load of the
    model (JSONDecodeError, in every serving worker) until someone deleted it."""
    Predictor(folder, threads=1)
    (record,) = (tmp_path / "cache" / "engine-choice").glob("*.json")
    record.write_text(damage)
    again = Predictor(folder, threads=1).choice
    assert again.race.cached is False and str(again.variant) in PASSED
    assert list(json.loads(record.read_text())["images_per_s"])


def test_a_variant_that_failed_for_one_version_is_raced_for_the_next(
    folder: Path, tmp_path: Path
) -> None:
    """The race is shared by every version of a network, but a file that failed is that
    version's: the next version's file of the variant is raced, not skipped for good."""
    healthy = tmp_path / "version-2"
    shutil.copytree(folder, healthy)
    onnx = folder / "inference.onnx"
    onnx.write_bytes(onnx.read_bytes()[:5000])
    first = Predictor(folder, threads=1).choice
    assert "InvalidProtobuf" in first.skipped["onnxruntime/fp32"]
    assert "onnxruntime/fp32" not in first.race.images_per_s

    second = Predictor(healthy, threads=1).choice
    assert second.race.cached is True
    assert "onnxruntime/fp32" in second.race.images_per_s
    assert "onnxruntime/fp32" not in second.skipped


def test_the_race_is_keyed_by_the_network_not_by_its_files(folder: Path, tmp_path: Path) -> None:
    requested = matching_variants()
    copy = tmp_path / "elsewhere"
    shutil.copytree(folder, copy)

    def key(path: Path) -> str:
        return race_key(load_folder(path), requested, 1)

    assert key(folder) == key(copy)
    for path in (folder, copy):  # a bare folder, no recorded architecture: keyed by its files
        info = load_folder(path).info
        write_info(path, {k: v for k, v in info.items() if k != "architecture"})
    assert key(folder) != key(copy)


def test_an_engine_error_over_several_lines_is_reported_on_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """OpenVINO's exceptions carry its C++ call sites, one per line (e.g. for a thread count
    it refuses); ``auto``'s reasons go into the CLIs' one error line, so they stay on one."""

    class Refuses(OpenVinoEngine):
        def __init__(self, *args: object) -> None:
            raise RuntimeError(
                "Exception from src/inference/src/cpp/core.cpp:117:\n"
                "Check 'val_i >= 0' failed\nWrong value for property key. Got: -1\n\n\n"
            )

    monkeypatch.setitem(ENGINES, "openvino", Refuses)
    model = SimpleNamespace(name="m", preprocess=SimpleNamespace(crop_size=8))
    race, _ = _race(model, [Variant("openvino", "fp32")], 1)
    (reason,) = race.not_runnable.values()
    assert len(reason.splitlines()) == 1 and race.ranking == []
    assert "RuntimeError: Exception from" in reason and "Got: -1" in reason


def test_when_no_variant_runs_nothing_is_cached(folder: Path, monkeypatch) -> None:
    """Every requested variant refused: one error naming each, and the next process races
    again (an engine installed meanwhile is found)."""

    class Refuses(OpenVinoEngine):
        def __init__(self, *args: object) -> None:
            raise RuntimeError("no")

    monkeypatch.setitem(ENGINES, "openvino", Refuses)
    for _ in range(2):
        with pytest.raises(
            AccuracyGuardError, match="runs here: openvino/fp32: .*RuntimeError: no"
        ):
            choose(load_folder(folder), engine="openvino", threads=1)
    monkeypatch.setitem(ENGINES, "openvino", OpenVinoEngine)
    assert choose(load_folder(folder), engine="openvino", threads=1).race.cached is False


def test_a_variant_that_loads_then_fails_to_run_loses_only_its_place(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, an engine that raised in the race's timing failed ``auto`` as a whole."""

    class FailsToRun(OnnxRuntimeEngine):
        def predict(self, batch: np.ndarray) -> np.ndarray:
            raise RuntimeError("kernel\nnot available")

    monkeypatch.setitem(ENGINES, "onnxruntime", FailsToRun)
    auto = Predictor(folder, threads=1)
    assert str(auto.variant) != "onnxruntime/fp32"
    assert "onnxruntime/fp32" not in auto.choice.race.images_per_s
    assert auto.choice.skipped["onnxruntime/fp32"] == "RuntimeError: kernel not available"


def test_a_named_variant_its_engine_refuses_is_one_line(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A damaged file named outright (``--engine onnxruntime``) raised the engine's own
    exception (ONNX Runtime's InvalidProtobuf): a traceback from the CLIs, not their one line."""

    class Refuses(OnnxRuntimeEngine):
        def __init__(self, *args: object) -> None:
            raise RuntimeError(
                "[ONNXRuntimeError] : 7 : INVALID_PROTOBUF :\nProtobuf parsing failed."
            )

    monkeypatch.setitem(ENGINES, "onnxruntime", Refuses)
    with pytest.raises(ValueError) as raised:
        Predictor(folder, engine="onnxruntime", precision="fp32", threads=1)
    assert str(raised.value) == (
        f"onnxruntime/fp32 cannot load {folder}: RuntimeError: [ONNXRuntimeError] : 7 : "
        "INVALID_PROTOBUF : Protobuf parsing failed."
    )


def test_a_lower_precision_ranks_first_only_when_clearly_faster() -> None:
    """Within a race's noise the more precise variant serves (a tie, bf16 8,238 against fp32
    8,229 img/s, went to bf16); PRECISION_MARGIN faster per step, the lower one does."""
    tie = {"openvino/int8": 1010.0, "openvino/bf16": 1005.0, "openvino/fp32": 1000.0}
    assert list(ranked(tie)) == ["openvino/fp32", "openvino/bf16", "openvino/int8"]
    faster = 1000.0 * (1 + PRECISION_MARGIN) * 1.01
    assert list(ranked({"openvino/fp32": 1000.0, "openvino/bf16": faster}))[0] == "openvino/bf16"
    two_steps = {"paddle/fp32": 1000.0, "openvino/int8": faster}  # one step's margin: not two
    assert list(ranked(two_steps))[0] == "paddle/fp32"
    fp32 = {"paddle/fp32": 1000.0, "onnxruntime/fp32": 1001.0}  # same precision: speed alone
    assert list(ranked(fp32))[0] == "onnxruntime/fp32"


CRASH_OPENVINO_FP32 = """
import os, signal
from lcnet_runner import engines

class Crashes(engines.OpenVinoEngine):
    def __init__(self, artifact, threads, precision):
        if precision == "fp32":
            os.kill(os.getpid(), signal.{signal})
        super().__init__(artifact, threads, precision)

engines.ENGINES["openvino"] = Crashes
"""


def crash_openvino_fp32_in_children(tmp_path: Path, monkeypatch, signal: str) -> None:
    """Child processes (the race's) die of ``signal`` as they load openvino/fp32."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(CRASH_OPENVINO_FP32.format(signal=signal))
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")])
    )


def test_a_variant_that_crashes_the_race_is_not_runnable_and_the_rest_serve(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A native crash of one variant in the race's child stopped every worker from starting
    ("the engine race failed: exit code -11"), at every restart: it is that variant's failure
    alone, cached as such."""
    crash_openvino_fp32_in_children(tmp_path, monkeypatch, "SIGSEGV")  # a native fault
    choice = choose(load_folder(folder), threads=1, race_in_child=True)
    why = choice.race.not_runnable["openvino/fp32"]
    assert why == "crashed the engine race (killed by signal 11)"
    assert "openvino/fp32" not in choice.race.ranking and str(choice.variant) in PASSED
    assert choice.skipped["openvino/fp32"] == why
    assert choose(load_folder(folder), threads=1, race_in_child=True).race.cached


def test_the_cli_survives_a_variant_that_crashes_its_race(
    trained: dict, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`python -m lcnet_runner predict` raced in its own process: an engine's segfault there
    ended the command with no message. It races in a child, as a server does."""
    crash_openvino_fp32_in_children(tmp_path, monkeypatch, "SIGSEGV")  # this CLI's process too
    image = trained["dataset"] / "green" / "1.jpg"
    result = run_cli("lcnet_runner", "predict", str(image), "--model", str(folder), "--threads",
                     "1", "--benchmark", "1")  # fmt: skip
    assert '"predictions"' in result.stdout
    assert "openvino/fp32" not in result.stdout.split("engine: ")[1].split(" ")[0]


def test_a_race_killed_from_outside_blames_no_variant(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The OOM killer's SIGKILL (or a stop) mid-race says nothing of the variant being timed:
    the race fails, nothing is cached, the next start races again."""
    crash_openvino_fp32_in_children(tmp_path, monkeypatch, "SIGKILL")
    with pytest.raises(AccuracyGuardError, match="the engine race failed: killed by signal 9"):
        choose(load_folder(folder), threads=1, race_in_child=True)
    assert list((tmp_path / "cache" / "engine-choice").glob("*.json")) == []


def test_a_race_ended_as_its_worker_stops_is_not_cached(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A serving worker told to stop while a new version's race runs ends the race's child (it
    would outlive the worker): no race, nothing cached, the next start races again."""
    from lcnet_runner.runner import LCNetRunner, RunnerConfig

    hooks = tmp_path / "hooks"
    hooks.mkdir()
    slow_race = 'import sys, time\nif "lcnet_runner.choice" in sys.orig_argv: time.sleep(60)\n'
    (hooks / "sitecustomize.py").write_text(slow_race)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")])
    )
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    start = time.monotonic()
    with pytest.raises(ChildStoppedError):
        LCNetRunner(load_folder(folder), RunnerConfig(threads=1), stop=stop)
    assert time.monotonic() - start < 5
    assert list((tmp_path / "cache" / "engine-choice").glob("*.json")) == []
