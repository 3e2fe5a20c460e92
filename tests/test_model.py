"""PP-LCNet builds at every scale and matches PaddleClas' parameter names and shapes exactly."""

from __future__ import annotations

import json

import numpy as np
import paddle
import pytest
from conftest import FIXTURES

from train.config import SCALES
from train.model import build_model, make_divisible

OFFICIAL = json.loads((FIXTURES / "pplcnet_paddleclas_state_dict_keys.json").read_text())
# Trainable parameters with 1000 classes, as PaddleClas counts them.
PARAM_COUNTS = {"x0_25": 1_521_184, "x0_5": 1_879_576, "x1_0": 2_952_520, "x2_5": 9_017_560}


@pytest.mark.parametrize("scale", sorted(OFFICIAL))
def test_state_dict_matches_paddleclas_key_for_key(scale: str) -> None:
    model = build_model(f"PPLCNet_{scale}", num_classes=1000)
    ours = [[name, list(tensor.shape)] for name, tensor in model.state_dict().items()]
    assert ours == OFFICIAL[scale]
    trainable = sum(int(p.numel()) for p in model.parameters() if not p.stop_gradient)
    assert trainable == PARAM_COUNTS[scale]


@pytest.mark.parametrize("name", list(SCALES))
def test_every_scale_runs_on_a_tiny_input(name: str) -> None:
    model = build_model(name, num_classes=3)
    model.eval()
    out = model(paddle.to_tensor(np.random.default_rng(0).random((2, 3, 32, 32), np.float32)))
    assert out.shape == [2, 3]
    assert np.isfinite(out.numpy()).all()


def test_unknown_model_lists_the_valid_names() -> None:
    with pytest.raises(ValueError, match="PPLCNet_x0_25.*PPLCNet_x2_5"):
        build_model("PPLCNet_x9", num_classes=3)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("PPLCNet_x0_25", num_classes=0)


def test_make_divisible_matches_paddleclas() -> None:
    assert [make_divisible(16 * s) for s in (0.25, 0.35, 0.5, 1.0, 2.5)] == [8, 8, 8, 16, 40]
    assert make_divisible(512 * 0.35) == 176
