"""Lightning callbacks."""

from smolfactory.callbacks.export import HFExport
from smolfactory.callbacks.interrupt import SaveOnInterrupt
from smolfactory.callbacks.predictions import PredictionWriter

__all__ = ["HFExport", "PredictionWriter", "SaveOnInterrupt"]
