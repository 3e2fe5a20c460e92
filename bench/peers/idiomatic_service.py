"""The BentoML service a user writes from the docs around our Predictor: one batchable API,
2 workers × 1 engine thread (our server's default on 2 cores). `bentoml serve
idiomatic_service:Classifier` from this folder; `bench/vs_peers.py` measures it."""

import os

import bentoml
from PIL.Image import Image

from lcnet_runner import Predictor

MODEL = os.environ.get("LCNET_MODEL", "pplcnet:latest")


@bentoml.service(workers=2)
class Classifier:
    model = bentoml.models.BentoModel(MODEL)

    def __init__(self) -> None:
        # The benchmark's model has random weights: it skips the accuracy guard, as ours does.
        skip = os.environ.get("LCNET_SKIP_GUARD") == "1"
        self.predictor = Predictor(str(self.model.tag), threads=1, skip_guard=skip)

    @bentoml.api(batchable=True, max_batch_size=16, max_latency_ms=1000)
    def classify(self, images: list[Image]) -> list[list[dict]]:
        return self.predictor.predict(images)
