"""Exported folders load in PaddleX 3 (`paddlex.create_model`) and agree with our Predictor."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import PADDLE_FP32
from PIL import Image

from lcnet_runner import Predictor
from train.split import read_split

paddlex = pytest.importorskip("paddlex")


def test_paddlex_create_model_agrees_on_top1(trained: dict) -> None:
    folder = trained["export_dir"]
    ours = Predictor(folder, threads=1, **PADDLE_FP32)  # PaddleX runs Paddle Inference fp32
    theirs = paddlex.create_model(model_name="PP-LCNet_x0_25", model_dir=folder)
    images = [
        np.asarray(Image.open(path).convert("RGB"))
        for path, _ in read_split(trained["dataset"], "test")
    ]
    for image in images:
        expected = ours.predict(image, top_k=1, bgr=False)[0]
        # PaddleX takes BGR arrays; batch_size=1 because 3.7.2 mixes ids across a batch.
        (result,) = list(theirs.predict(image[:, :, ::-1].copy(), batch_size=1))
        assert int(np.ravel(result["class_ids"])[0]) == expected["category_id"]
        assert result["label_names"][0] == expected["category"]
        assert float(result["scores"][0]) == pytest.approx(expected["score"], abs=1e-4)
