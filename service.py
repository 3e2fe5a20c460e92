"""`bentoml serve` entry point: the service lives in lcnet_runner.service."""

from lcnet_runner.service import LCNetService

__all__ = ["LCNetService"]
