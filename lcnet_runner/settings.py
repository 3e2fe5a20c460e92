"""Serving settings, read once from ``LCNET_*`` environment variables (``bentofile.yaml``
sets defaults for a Bento under ``envs``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from .artifact import DEFAULT_MODEL
from .engines import default_threads
from .runner import RunnerConfig


@dataclass(frozen=True)
class ServingSettings:
    """Each field ``name`` is read from ``LCNET_<NAME>``; defaults are safe and fast on 2 cores."""

    model: str = DEFAULT_MODEL  # store tag (or exported folder) to serve
    engine: str = "auto"  # auto | paddle | onnxruntime | openvino
    precision: str = "auto"  # auto | fp32 | bf16 | int8 (bf16, int8: openvino)
    skip_guard: bool = False  # serve a variant that lacks passing accuracy-guard figures
    threads: int = 1  # engine threads per worker
    workers: int = 0  # 0: cores ÷ threads (measured best on 2 cores: 2 workers × 1 thread)
    max_batch_size: int = 16  # 1 turns batching off
    max_delay_ms: float = 10.0
    max_body_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_batch_images: int = 64
    grpc_port: int = 50051  # 0 disables gRPC
    grpc_host: str = "0.0.0.0"
    cors_origins: str = ""  # comma-separated origins allowed to call the API from a browser

    def runner_config(self) -> RunnerConfig:
        return RunnerConfig(
            engine=self.engine,
            precision=self.precision,
            skip_guard=self.skip_guard,
            threads=self.threads,
            max_batch_size=self.max_batch_size,
            max_delay_ms=self.max_delay_ms,
            max_pixels=self.max_pixels,
        )

    @property
    def worker_count(self) -> int:
        return self.workers or max(1, default_threads() // max(1, self.threads))

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> ServingSettings:
        environ = dict(os.environ if environ is None else environ)
        values = {}
        for field in fields(cls):
            raw = environ.get(f"LCNET_{field.name.upper()}")
            if raw is None or raw == "":
                continue
            kind = type(getattr(cls, field.name))
            word = raw.strip().lower()
            if field.name == "grpc_port" and word in _FALSE:
                values[field.name] = 0
            elif kind is bool:
                if word not in _TRUE | _FALSE:
                    raise ValueError(f"LCNET_{field.name.upper()}={raw!r} is not 1 or 0")
                values[field.name] = word in _TRUE
            else:
                try:
                    values[field.name] = kind(raw)
                except ValueError:
                    raise ValueError(
                        f"LCNET_{field.name.upper()}={raw!r} is not a {kind.__name__}"
                    ) from None
        return cls(**values)


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
