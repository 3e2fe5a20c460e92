"""The committed gRPC stubs are exactly what `make proto` generates from lcnet.proto."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

GENERATED = ("lcnet_pb2.py", "lcnet_pb2.pyi", "lcnet_pb2_grpc.py")


def test_stubs_are_reproducible_from_the_proto(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    protos = tmp_path / "lcnet_runner" / "protos"
    protos.mkdir(parents=True)
    shutil.copy(ROOT / "lcnet_runner" / "protos" / "lcnet.proto", protos)
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", "--python_out=.",
         "--grpc_python_out=.", "--pyi_out=.", "lcnet_runner/protos/lcnet.proto"],
        cwd=tmp_path, check=True,
    )  # fmt: skip
    for name in GENERATED:
        committed = (ROOT / "lcnet_runner" / "protos" / name).read_text()
        assert (protos / name).read_text() == committed, f"{name} is stale: run `make proto`"
