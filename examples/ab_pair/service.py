"""Two PP-LCNet models in one's own BentoML service: an A/B pair answering side by side.

    LCNET_MODEL_A=pplcnet:latest LCNET_MODEL_B=other:latest bentoml serve service:ABPair

Each worker holds one runner per model (in-process, batching on its own); the service's own
``@bentoml.api`` calls them. The ``BentoModel`` references (``pinned_model``) make ``bentoml
build`` pack both models, and a Bento serves the versions it packed (a Bento does not record
the variables it was built with: its container needs the same LCNET_MODEL_A/B). ``lcnet_runner``
is not on PyPI, so a bentofile for this service lists it under ``python.packages``
(``lcnet-bento @ git+<your clone>``) or includes a copy of it. An
undecodable upload is BentoML's InvalidArgument (400), and each runner's batch sizes and
latencies are on ``/metrics`` under its own ``model`` label: its side and tag (``a/pplcnet:…``),
so two versions of one model, the usual A/B, stay apart.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import bentoml

from lcnet_runner import LCNetRunner, pinned_model
from lcnet_runner.metrics import PrometheusObserver


@bentoml.service(workers=1)
class ABPair:
    # The versions the tags name when `bentoml serve` starts: a restarted worker loads them too.
    model_a = pinned_model(os.environ.get("LCNET_MODEL_A", "pplcnet:latest"))
    model_b = pinned_model(os.environ.get("LCNET_MODEL_B", "pplcnet:latest"))

    def __init__(self) -> None:
        # 2 cores, 1 worker: each runner's engine gets one thread.
        self.a = self._runner("a", self.model_a)
        self.b = self._runner("b", self.model_b)

    @staticmethod
    def _runner(side: str, model: bentoml.models.BentoModel) -> LCNetRunner:
        observer = PrometheusObserver(f"{side}/{model.tag}")
        return LCNetRunner.from_model(str(model.tag), engine="auto", threads=1, observer=observer)

    @bentoml.api
    async def compare(self, image: Path, top_k: int = 1) -> dict:
        """Both models' top-k for one uploaded image, and whether their top-1 agree."""
        data = image.read_bytes()
        a, b = await asyncio.gather(self.a.aclassify(data, top_k), self.b.aclassify(data, top_k))
        return {"a": a, "b": b, "agree": a[0]["category"] == b[0]["category"]}

    @bentoml.on_shutdown
    async def close(self) -> None:
        await asyncio.gather(self.a.close(), self.b.close())
