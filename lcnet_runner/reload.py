"""New model versions served without a restart: each worker loads, checks and warms a version in
the background while the current one serves, then swaps between requests.

How the workers of one server converge: workers share no channel, so each one runs a
``Reloader`` that looks for what it should serve — the store's newest version of the served name
(``LCNET_RELOAD=watch``), and a request file that ``POST /admin/reload`` writes (the request
reaches one worker; every worker reads the file). When both name a version, the later one wins:
the request's time against the version's creation time. Every worker applies that rule to the
same store and file, so one that restarts (on the version the server started with) comes back on
what the others serve, whatever order it reads them in. One exception needs a record: when the
version the rule names fails everywhere, the others keep the last one that loaded, which the rule
does not name. So each worker writes the version it swapped in next to the request file, and a
worker whose reload failed serves that one, if it serves something else — also when that is the
version that failed here but loaded elsewhere (a passing failure), tried again less and less
often until it loads.

A request pins the version it entered with (``ServedModel.pinned``): its preprocessing, batches
and labels all come from that version, and the old version is closed and released only once its
last request has answered. A version that fails its checks, its accuracy guard or its warm-up
is never swapped in: the old one keeps serving and ``/model`` says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from . import servers
from .artifact import (
    ModelNotFoundError,
    bentoml_home,
    load_folder,
    verify_checksums,
    write_text_atomic,
)
from .child import ChildStoppedError, run_python
from .runner import LCNetRunner, release_free_memory

logger = logging.getLogger("bentoml.lcnet")
REQUEST_POLL_S = 0.5  # how often a worker looks at the request file (a stat call)
REJOIN_RETRY_S = (10.0, 300.0)  # after a failed reload, first wait to try again, doubling to max
# How long a worker told to stop waits for the load under way: one ending its child process
# (child.STOP_GRACE_S at most) ends within it; one still working here is left to its thread.
STOPPING_LOAD_WAIT_S = 5.0


@dataclass
class ReloadStatus:
    """What ``/model`` says of the last reload: idle | loading | failed (the old one serves) |
    interrupted (the worker began to stop while it loaded)."""

    state: str = "idle"
    tag: str | None = None
    error: str | None = None


class _Version:
    def __init__(self, runner: LCNetRunner):
        self.runner = runner
        self.in_flight = 0
        self.drained = asyncio.Event()


class ServedModel:
    """The runner a worker serves now. Used from the worker's event loop only. ``on_serving`` is
    told each runner that starts (True) or stops (False) being the one served: a metric of the
    versions the workers serve."""

    def __init__(
        self, runner: LCNetRunner, on_serving: Callable[[LCNetRunner, bool], None] | None = None
    ):
        self._current = _Version(runner)
        self._on_serving = on_serving or (lambda runner, serving: None)
        self._on_serving(runner, True)

    @property
    def runner(self) -> LCNetRunner:
        return self._current.runner

    @property
    def tag(self) -> str:
        return self._current.runner.tag

    @contextmanager
    def pinned(self) -> Iterator[LCNetRunner]:
        """The current runner, kept open until the request using it has answered."""
        version = self._current
        version.in_flight += 1
        try:
            yield version.runner
        finally:
            version.in_flight -= 1
            if version.in_flight == 0:
                version.drained.set()

    def swap(self, runner: LCNetRunner) -> Coroutine[None, None, None]:
        """Serve ``runner`` from the next request on, at once; returns the old version's
        retirement to await: it closes once its last request has answered (a slow upload may
        take up to the body timeout)."""
        old, self._current = self._current, _Version(runner)
        self._on_serving(old.runner, False)  # first: a swap to the same version ends served
        self._on_serving(runner, True)
        return self._retire(old)

    @staticmethod
    async def _retire(old: _Version) -> None:
        if old.in_flight:
            old.drained.clear()
            await old.drained.wait()
        await old.runner.close()
        del old
        release_memory()

    async def close(self) -> None:
        self._on_serving(self._current.runner, False)
        await self._current.runner.close()


def release_memory() -> None:
    """Hand a dropped model's memory back to the system: glibc keeps freed blocks in its arenas
    otherwise, and each swap would look like a leak."""
    gc.collect()
    release_free_memory()


def request_file(model_name: str) -> Path:
    """Where ``POST /admin/reload`` records the wanted version for this server's workers: next to
    the store, one file per server (its arbiter's pid and start time) and model name, beside
    which each worker records the version it swapped in (``.served.json``)."""
    server = servers.this_server()  # pid:start, a file name's pid-start
    return _records_folder() / f"{model_name}-{server.replace(':', '-')}.json"


def _record_server(record: Path) -> str | None:
    """The server a record of ``request_file``'s is named after (``pid:start``), read back from
    ``<model name>-<pid>-<start>[.served].json``; None for another file."""
    name_pid_start = record.name.removesuffix(".json").removesuffix(".served").rsplit("-", 2)
    if len(name_pid_start) != 3 or not name_pid_start[1].isdigit():
        return None
    return f"{name_pid_start[1]}:{name_pid_start[2]}"


def _records_folder() -> Path:
    """The records of this host's servers: one folder per host name and PID namespace, since
    servers in other containers may share the store, and only here can a pid be looked up."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # not Linux
        namespace = 0
    return Path(bentoml_home()) / "lcnet-reload" / f"{socket.gethostname()}-{namespace}"


def forget_stopped_servers() -> None:
    """Delete the records (request and served version) of this host's servers that have stopped:
    every run of a server left its two files behind for good."""
    for path in _records_folder().glob("*.json"):
        server = _record_server(path)
        if server is not None and not servers.server_alive(server):
            path.unlink(missing_ok=True)


def write_request(path: Path, tag: str) -> None:
    _write_record(path, {"id": uuid.uuid4().hex, "tag": tag, "at": time.time()})


def _write_record(path: Path, record: dict) -> None:
    """A record the workers share (in ``lcnet-reload/``), replaced whole: a reader never sees
    half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(record))


def find_stored(tag: str):
    """The stored model ``tag`` names: a version from whichever store has it; ``name`` or
    ``name:latest``, the newest version in any. The stores are BentoML's and, when BentoML
    serves a Bento's own (in a container: the models packed in it), the one at BENTOML_HOME too,
    where new versions arrive (a mounted volume)."""
    import bentoml
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.models.model import ModelStore

    serving = BentoMLContainer.model_store.get()
    home = Path(bentoml_home()) / "models"
    stores = [serving]
    if Path(getattr(serving, "_path", home)).resolve() != home.resolve():
        stores.append(ModelStore(home))
    found = []
    for store in stores:
        with contextlib.suppress(bentoml.exceptions.NotFound):
            found.append(bentoml.models.get(tag, _model_store=store))
    if not found:
        raise bentoml.exceptions.NotFound(f"{tag} is not in the BentoML store")
    return max(found, key=lambda model: model.creation_time)


def resolve(tag: str) -> str:
    """A store tag with its version (``name`` and ``name:latest`` → the newest version)."""
    import bentoml

    try:
        bentoml.Tag.from_taglike(tag)
    except (bentoml.exceptions.BentoMLException, ValueError) as err:  # "Invalid Tag x:y:z"
        raise ValueError(f"{tag!r} is not a store tag such as 'name:version': {err}") from None
    try:
        return str(find_stored(tag).tag)
    except bentoml.exceptions.NotFound:
        raise ModelNotFoundError(f"{tag} is not in the BentoML store") from None
    # A damaged model.yaml raises whatever its reader meets: BentoML's "malformed model.yaml",
    # YAML's ScannerError, cattrs' validation errors, a KeyError for a missing field...
    except Exception as err:
        raise UnreadableModelError(
            f"{tag}: its store entry cannot be read ({type(err).__name__}: {err}): store that "
            "version again"
        ) from None


def in_store(tag: str) -> bool:
    """Whether the store still holds ``tag`` (a version may be deleted after a rollout)."""
    try:
        find_stored(tag)
    except Exception:  # not there, or no longer readable: not a version to move to
        return False
    return True


class UnreadableModelError(RuntimeError):
    """A version in the store whose entry BentoML cannot read (its own ``model.yaml``)."""


class Reloader:
    """Watches for the version this worker should serve and swaps it in (one at a time).
    ``make_runner(artifact, stop=event)`` builds a version's runner; ``stop`` is set when a stop
    signal reaches the worker, and ends the child processes it started (an engine race)."""

    def __init__(
        self,
        served: ServedModel,
        model_name: str,
        *,
        watch: bool,
        interval_s: float,
        make_runner: Callable[..., LCNetRunner],
        on_result: Callable[[str], None] | None = None,
    ):
        self.served, self.model_name = served, model_name
        self.watch, self.interval_s = watch, interval_s
        self.make_runner, self.on_result = make_runner, on_result
        self.status = ReloadStatus(tag=served.tag)
        self.started_on = served.tag  # what a worker restarted now starts on, if still stored
        self.request_path = request_file(model_name)
        # the last version swapped in
        self.swapped_in = self.request_path.with_suffix(".served.json")
        self._request_id: str | None = None
        self._request_stamp: tuple[int, int] | None = None  # (inode, mtime) last read
        self._request_at = 0.0  # when the last request acted on was made
        self._request_tag: str | None = None  # and the version it named
        self._store_error: str | None = None  # why the last look at the store failed
        self._left_store: str | None = None  # a served version found gone from the store
        self._latest_seen = served.tag if watch else None
        self._rejoin_at, self._rejoin_wait_s = 0.0, REJOIN_RETRY_S[0]
        self._task: asyncio.Task[None] | None = None
        self._loading: asyncio.Task[LCNetRunner] | None = None  # the load under way, if any
        # Set as a stop signal reaches the worker: the signal that stops a server's whole
        # process group stops a child checking a version too, which is no fault of the version;
        # one that reaches the worker alone (BentoML's arbiter stopping its workers) does not,
        # and the load ends that child itself (run_python's ``stop``).
        self._told_to_stop = threading.Event()

    def start(self) -> None:
        with contextlib.suppress(OSError):
            forget_stopped_servers()
        servers.on_stop_signal(self._told_to_stop.set)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="lcnet-reloader")

    async def stop(self) -> None:
        """Cancel the watch and wait for it to end, so no swap begins while the worker stops (a
        load running in its thread finishes there, unused). After a stop signal, a load under
        way is waited for first: it ends its child process, which would outlive the worker
        (uvicorn ends the process by the signal once it has shut down), and says it was
        interrupted (its task resumes before this one, as it awaited the load first)."""
        if self._task is None:
            return
        if self._told_to_stop.is_set() and self._loading is not None:
            await asyncio.wait({self._loading}, timeout=STOPPING_LOAD_WAIT_S)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def request(self, tag: str | None) -> str:
        """Record a reload request every worker will act on; returns the resolved tag."""
        tag = resolve(tag or f"{self.model_name}:latest")
        if tag.split(":")[0] != self.model_name:
            raise ValueError(f"this server serves {self.model_name!r}, not {tag!r}")
        write_request(self.request_path, tag)
        return tag

    async def _run(self) -> None:
        next_watch = time.monotonic()
        while True:
            try:
                wanted = self._requested()
                if wanted not in (None, self.served.tag) and not await asyncio.to_thread(
                    in_store, wanted
                ):  # e.g. read by a worker restarted after the others moved off it
                    logger.info("reload: %s, the last request's, left the store: passed over",
                                wanted)  # fmt: skip
                    wanted = None
                if self.watch and time.monotonic() >= next_watch:
                    next_watch = time.monotonic() + self.interval_s
                    wanted = await asyncio.to_thread(self._newest) or wanted
                if wanted is None and self._served_left_the_store():
                    wanted = await asyncio.to_thread(self._successor)
                if wanted == self.served.tag:
                    self.status = ReloadStatus("idle", wanted)  # e.g. back to it after a failure
                elif wanted is not None:
                    await self.reload(wanted)
                if self.status.state == "failed":
                    await self._rejoin()
            except Exception:  # one bad look must not end this worker's reloading, unseen
                logger.exception("reload: looking for a new version failed; looking again")
            await asyncio.sleep(REQUEST_POLL_S)

    def _requested(self) -> str | None:
        """The tag of a request not acted on yet (every request is acted on once). The file is
        read only when it was replaced: each request is written to a new inode."""
        try:
            stat = self.request_path.stat()
            if (stat.st_ino, stat.st_mtime_ns) == self._request_stamp:
                return None
            request = json.loads(self.request_path.read_text(encoding="utf-8"))
            request_id, at, tag = request["id"], float(request["at"]), str(request["tag"])
        except (OSError, ValueError, LookupError, TypeError):  # being replaced, or not a request
            return None
        self._request_stamp = (stat.st_ino, stat.st_mtime_ns)
        if request_id == self._request_id:
            return None
        self._request_id, self._request_at, self._request_tag = request_id, at, tag
        return tag

    def _newest(self) -> str | None:
        """The store's newest version, when it changed since the last look and was created after
        the last request: a request for an older version outranks a version stored before it."""
        try:
            model = find_stored(f"{self.model_name}:latest")  # both stores read once per look
        except Exception as err:  # a store entry being written, or damaged: looked at again
            self._cannot_read_the_store(err)
            return None
        if self._store_error is not None:  # readable again: what failed was the look
            if self.status.error == self._store_error:
                self.status = ReloadStatus("idle", self.served.tag)
            self._store_error = None
        newest = str(model.tag)
        if newest == self._latest_seen:
            return None
        after_the_request = model.info.creation_time.timestamp() > self._request_at
        self._latest_seen = newest
        return newest if after_the_request else None

    def _cannot_read_the_store(self, err: Exception) -> None:
        """Said once per cause, in the log, ``/model`` and the failed count: it was a warning
        every interval, and nothing an operator looks at."""
        why = f"cannot read the store: {type(err).__name__}: {err}"
        if why == self._store_error:
            return
        self._store_error = why
        logger.warning("reload: %s", why)
        self.status = ReloadStatus("failed", f"{self.model_name}:latest", why)
        self._count("failed")

    def _served_left_the_store(self) -> bool:
        """Whether the served version's folder has left the store since this worker loaded it,
        and no successor was found for it yet (a stat per look)."""
        served = self.served
        return served.tag != self._left_store and not served.runner.predictor.artifact.path.is_dir()

    def _successor(self) -> str | None:
        """What to serve once the served version has left the store (deleted after a rollout),
        where a worker restarted now cannot load it: what that worker comes to serve by the same
        rule, so the two end on one version. The newest stored, when watching and it is later
        than the last request; else the last request's version, if still stored; else the
        version this worker started on (the server's), or the newest when that left too."""
        try:
            newest = find_stored(f"{self.model_name}:latest")
        except Exception as err:  # looked for again next time
            self._cannot_read_the_store(err)
            return None
        if self.watch and newest.info.creation_time.timestamp() > self._request_at:
            successor = str(newest.tag)
        elif self._request_tag is not None and in_store(self._request_tag):
            successor = self._request_tag
        else:
            successor = self.started_on if in_store(self.started_on) else str(newest.tag)
        logger.warning("reload: %s left the store: moving to %s", self.served.tag, successor)
        self._left_store = self.served.tag  # once: a successor that fails is not retried
        return successor

    async def reload(self, tag: str) -> bool:
        """Load ``tag`` and swap it in; False if it failed (the served version stays)."""
        self.status = ReloadStatus("loading", tag)
        logger.info("reload: loading %s while %s serves", tag, self.served.tag)
        self._loading = asyncio.create_task(asyncio.to_thread(self._load, tag))
        try:
            runner = await self._loading
        except Exception as err:
            if self._told_to_stop.is_set():  # e.g. its child check, stopped by the same signal
                self._interrupted(tag, err)
            else:
                self.status = ReloadStatus("failed", tag, f"{type(err).__name__}: {err}")
                logger.error("reload: %s failed, %s keeps serving: %s", tag, self.served.tag, err)
                self._count("failed")
            return False
        finally:
            self._loading = None  # it holds the runner loaded: no reference past the swap
        _warn_of_other_classes(self.served.runner, runner)
        retire_the_old_version = self.served.swap(runner)
        # Said as soon as the new version answers, not once the old one's last request has
        # (``/model`` read "loading" for as long as a slow upload took).
        self.status = ReloadStatus("idle", tag)
        self._rejoin_at, self._rejoin_wait_s = 0.0, REJOIN_RETRY_S[0]
        logger.info("reload: now serving %s", tag)  # make_runner logged its engine choice
        self._count("ok")
        with contextlib.suppress(OSError):  # the record only helps a restarted worker rejoin
            _write_record(self.swapped_in, {"tag": tag})
        await retire_the_old_version  # one old version at a time: no third model in memory
        return True

    def _interrupted(self, tag: str, err: Exception) -> None:
        """A load that ended as the worker began to stop is no fault of the version (it was
        logged and counted as a failed reload): said as what it was."""
        self.status = ReloadStatus("interrupted", tag, "the server is shutting down")
        logger.info("reload: loading %s interrupted by the server's shutdown (%s: %s)",
                    tag, type(err).__name__, err)  # fmt: skip
        self._count("interrupted")

    async def _rejoin(self) -> None:
        """While this worker's last reload has failed: swap in the version the others last
        swapped in, if this worker serves another. That is the one they kept when a version
        failed everywhere (e.g. for a worker restarted since, on the version the server started
        with: ``/model`` keeps saying what failed, as theirs do), or the one that failed here
        and loaded there (a passing failure: a child timed out, memory ran short), tried again
        after a wait that doubles each time."""
        try:
            theirs = json.loads(self.swapped_in.read_text(encoding="utf-8"))["tag"]
        except (OSError, ValueError, KeyError, TypeError):
            return
        if theirs == self.served.tag or time.monotonic() < self._rejoin_at:
            return
        self._rejoin_at = time.monotonic() + self._rejoin_wait_s
        self._rejoin_wait_s = min(2 * self._rejoin_wait_s, REJOIN_RETRY_S[1])
        if not await asyncio.to_thread(in_store, theirs):  # deleted since: never loads again
            return  # (the others move off it too: _successor)
        failure = self.status
        await self.reload(theirs)
        if theirs != failure.tag:  # /model says what failed, as the others' do (reload logged
            self.status = failure  # the rejoin's own failure)

    def _load(self, tag: str) -> LCNetRunner:
        artifact = load_folder(find_stored(tag).path, tag=tag)
        if not verify_checksums(artifact.path):  # stored before checksums were recorded
            try_load_in_child(artifact.path, stop=self._told_to_stop)
        return self.make_runner(artifact, stop=self._told_to_stop)

    def _count(self, result: str) -> None:
        if self.on_result is not None:
            self.on_result(result)

    def describe(self) -> dict:
        return asdict(self.status)


def _warn_of_other_classes(served: LCNetRunner, new: LCNetRunner) -> None:
    """A new version may have other classes (one added, one dropped: a retrain's business),
    but a client that keeps ``category_id``s reads them against the old list from now on."""
    if list(new.labels) != list(served.labels):
        logger.warning(
            "reload: %s has other classes than %s (%d: %s; were %d): category_id changes "
            "meaning for clients",
            new.tag, served.tag, len(new.labels), ", ".join(new.labels[:8]), len(served.labels),
        )  # fmt: skip


def try_load_in_child(folder: Path, stop: threading.Event | None = None) -> None:
    """Load every variant of a model in a throwaway process first — whichever one this worker
    then serves, its file was read: if a file crashes native code, the child dies and this
    worker does not. ``stop`` set ends the child (ChildStoppedError)."""
    code = (
        "import sys; from lcnet_runner.predictor import each_variant\n"
        "for _ in each_variant(sys.argv[1], threads=1): pass"
    )
    try:
        run_python(["-c", code, str(folder)], timeout_s=300, stop=stop)
    except ChildStoppedError:  # no failure: said as is
        raise
    except ChildProcessError as err:
        raise RuntimeError(f"loading {folder.name} in a child process failed: {err}") from None
