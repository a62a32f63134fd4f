"""Lightning callbacks."""

from smolfactory.callbacks.export import HFExport
from smolfactory.callbacks.interrupt import SaveOnInterrupt
from smolfactory.callbacks.predictions import PredictionWriter
from smolfactory.callbacks.throughput import TokenThroughput

__all__ = ["HFExport", "PredictionWriter", "SaveOnInterrupt", "TokenThroughput"]
