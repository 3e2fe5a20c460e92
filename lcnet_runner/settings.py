"""Serving settings, read once from ``LCNET_*`` environment variables (``bentofile.yaml``
sets defaults for a Bento under ``envs``)."""

from __future__ import annotations

import math
import os
import shlex
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace

from .artifact import DEFAULT_MODEL
from .hardware import default_threads, resolve_threads
from .ranges import check_ranges, in_range, range_error
from .runner import RUNNER_RANGES, RunnerConfig

RELOAD_MODES = ("off", "watch", "request")
# How long BentoML lets an HTTP request run; a gRPC call in flight on a connection past its age
# gets as long.
REQUEST_TIMEOUT_S = 60


# A served runner's settings where they differ from an embedded one's: its queue is bounded, and
# a worker that is behind answers 503 at once (for the client or a balancer to retry elsewhere)
# rather than let clients wait up to BentoML's 60 s timeout (504). 512 small photos are 2-9 s of
# a worker on 2 cores; the benchmarks' 64 clients hold at most 256 in all.
SERVED_RUNNER = RunnerConfig(max_queued_images=512)


@dataclass(frozen=True)
class ServingSettings:
    """Each field ``name`` — and each field of ``runner`` — is read from ``LCNET_<NAME>``: the
    variables stay flat (``LCNET_ENGINE``, ``LCNET_THREADS``, ...). Defaults are safe and fast
    on 2 cores."""

    model: str = DEFAULT_MODEL  # the store tag to serve (`python -m train import` stores a folder)
    runner: RunnerConfig = SERVED_RUNNER  # engine, precision, threads, batching, limits
    workers: int = 0  # 0: cores ÷ threads (measured best on 2 cores: 2 workers × 1 thread)
    max_body_bytes: int = 20 * 1024 * 1024
    # The bytes of the requests a worker takes in and has not answered yet (bodies being read,
    # images decoding or queued): past it a new request is refused (503 / UNAVAILABLE) before
    # its body is read. 256 MiB: ~2,500 photos of 100 KB, 12 requests at the body limit. 0: none.
    max_held_bytes: int = 256 * 1024 * 1024
    body_timeout_s: float = 30.0  # a request body must have arrived whole by then (else 408)
    max_batch_images: int = 64
    grpc_port: int = 50051  # 0 disables gRPC
    grpc_host: str = "0.0.0.0"
    # A client's gRPC connection (and every call on its channel) stays with the worker that
    # accepted it. Ending each connection after this long (the client reconnects by itself,
    # calls in flight finish) lets the kernel spread it again: without it, channels opened while
    # one worker was still starting stay on the other for as long as they live. 0: never.
    grpc_max_connection_age_s: float = 60.0
    cors_origins: str = ""  # comma-separated origins allowed to call the API from a browser
    # New versions without a restart (lcnet_runner.reload): "off"; "watch" the store for a newer
    # version of the served name every reload_interval_s; "request" only on POST /admin/reload.
    reload: str = "off"
    reload_interval_s: float = 10.0
    # Enables the admin routes (POST /admin/reload, gRPC lcnet.v1.Admin); empty: they are 404.
    admin_token: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if os.sep in self.model:
            raise ValueError(
                f"LCNET_MODEL={self.model!r}: the server serves a store tag (name or name:version);"
                f" store a folder with `python -m train import {shlex.quote(self.model)}`"
            )
        if self.reload not in RELOAD_MODES:
            raise ValueError(f"LCNET_RELOAD={self.reload!r}: use one of {', '.join(RELOAD_MODES)}")
        if self.reload == "watch" and not self.model_name:
            raise ValueError(
                f"LCNET_RELOAD=watch follows the newest version of a store name, and "
                f"LCNET_MODEL={self.model} pins one: set LCNET_MODEL to the name alone"
            )
        if self.reload == "request" and not self.admin_token:
            raise ValueError("LCNET_RELOAD=request needs LCNET_ADMIN_TOKEN for POST /admin/reload")
        if self.admin_token and not (self.admin_token.isascii() and self.admin_token.isprintable()):
            # HTTP headers arrive as Latin-1 and gRPC metadata takes ASCII only: such a token
            # could never be sent right.
            raise ValueError("LCNET_ADMIN_TOKEN must be printable ASCII")
        if self.grpc_port and not _resolves(self.grpc_host):
            raise ValueError(
                f"LCNET_GRPC_HOST={self.grpc_host!r} is neither an IP address nor a host name "
                "this machine resolves"
            )
        if self.body_timeout_s <= 0:
            raise ValueError("LCNET_BODY_TIMEOUT_S must be > 0")
        if self.reload_interval_s <= 0:
            raise ValueError("LCNET_RELOAD_INTERVAL_S must be > 0")
        check_ranges(self, SETTINGS_RANGES, env_variable)

    @property
    def worker_count(self) -> int:
        threads = resolve_threads(self.runner.threads)  # 0: an engine on every core
        return self.workers or max(1, default_threads() // threads)

    @property
    def model_name(self) -> str | None:
        """The store name whose newest version ``model`` follows (``name`` or ``name:latest``);
        None for a pinned version."""
        name, _, version = self.model.partition(":")
        return name if version in ("", "latest") else None

    @property
    def cors_origin_list(self) -> list[str]:
        return [origin.strip() for origin in self.cors_origins.split(",") if origin.strip()]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServingSettings:
        environ = os.environ if environ is None else environ
        runner_values = _read(RunnerConfig, environ)
        try:
            runner = replace(SERVED_RUNNER, **runner_values)
        except ValueError as err:  # what _read cannot check alone: the engine × precision
            raise ValueError(f"LCNET_ENGINE / LCNET_PRECISION: {err}") from None
        return cls(**_read(cls, environ, skip={"runner"}), runner=runner)


# See RUNNER_RANGES. gRPC takes its options as C ints: bytes, and milliseconds of age.
SETTINGS_RANGES = {
    "workers": (0, 1024),
    "max_body_bytes": (1, 2**31 - 1),
    "max_held_bytes": (0, math.inf),
    "max_batch_images": (1, math.inf),
    "grpc_port": (0, 65535),
    "grpc_max_connection_age_s": (0, (2**31 - 1) // 1000),  # 0: never
}
_ENV_RANGES = {**RUNNER_RANGES, **SETTINGS_RANGES}


def env_variable(field_name: str) -> str:
    """The environment variable a settings field is read from."""
    return f"LCNET_{field_name.upper()}"


def is_set(field_name: str, environ: Mapping[str, str]) -> bool:
    """Whether ``environ`` sets the field: blank is unset, as everywhere in these settings."""
    return bool(environ.get(env_variable(field_name), "").strip())


def _read(config: type, environ: Mapping[str, str], skip: set[str] = frozenset()) -> dict:
    """The fields of ``config`` set in ``environ`` as ``LCNET_<FIELD>``, parsed to their type.
    Surrounding whitespace is dropped (a token read from a file ends in a newline); blank is
    unset."""
    values = {}
    for spec in fields(config):
        raw = environ.get(env_variable(spec.name), "").strip()
        if spec.name in skip or not raw:
            continue
        values[spec.name] = value = _parse(spec.name, raw, type(getattr(config, spec.name)))
        bounds = _ENV_RANGES.get(spec.name)
        if bounds is not None and not in_range(value, *bounds):
            # here, to name the variable: RunnerConfig knows nothing of the environment
            raise ValueError(range_error(env_variable(spec.name), raw, *bounds))
    return values


def _parse(name: str, raw: str, kind: type) -> object:
    word = raw.strip().lower()
    if name == "grpc_port" and word in _FALSE:
        return 0
    if kind is bool:
        if word not in _TRUE | _FALSE:
            raise ValueError(f"{env_variable(name)}={raw!r} is not 1 or 0")
        return word in _TRUE
    try:
        value = kind(raw)
    except ValueError:
        noun = "a whole number" if kind is int else "a number"
        raise ValueError(f"{env_variable(name)}={raw!r} is not {noun}") from None
    # float() reads "nan" and "inf": NaN passes every "> 0" check (all its comparisons are
    # false) and an endless duration overflows where it becomes milliseconds.
    if kind is float and not math.isfinite(value):
        raise ValueError(f"{env_variable(name)}={raw!r} is not a finite number")
    return value


def _resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host.removeprefix("[").removesuffix("]"), None)
    except (socket.gaierror, UnicodeError):
        return False
    return True


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
