"""Another service that uses lcnet-bento's through ``bentoml.depends``: BentoML starts ours as a
dependency in its own worker process(es) and the call crosses a local HTTP hop.

    LCNET_MODEL=pplcnet:latest LCNET_WORKERS=1 bentoml serve service:Shop

Embedding the runner (examples/ab_pair) skips that hop; depend on the service when it should
scale, restart or be deployed on its own.
"""

from __future__ import annotations

from pathlib import Path

import bentoml

from lcnet_runner.service import LCNetService


@bentoml.service(workers=1)
class Shop:
    classifier = bentoml.depends(LCNetService)

    @bentoml.api
    async def tag_product(self, photo: Path) -> dict:
        """A product photo's tag and how sure the model is."""
        # Between services BentoML hands back the declared type: PredictionOut models.
        (best,) = await self.classifier.to_async.predict(image=photo, top_k=1)
        return {"tag": best.category, "confident": best.score >= 0.5}

    @bentoml.api
    async def tag_products(self, photos: list[Path]) -> list[str]:
        """Several photos in one batch; ours refuses a bad batch (none, too many) with a 4xx."""
        results = await self.classifier.to_async.predict_batch(images=photos, top_k=1)
        return [best.category for (best,) in results]
