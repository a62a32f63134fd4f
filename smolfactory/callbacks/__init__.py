"""Lightning callbacks."""

from smolfactory.callbacks.evaluation import TaskEvaluation
from smolfactory.callbacks.export import HFExport
from smolfactory.callbacks.host_memory import HostMemory
from smolfactory.callbacks.interrupt import SaveOnInterrupt
from smolfactory.callbacks.predictions import PredictionWriter
from smolfactory.callbacks.samples import GenerationSamples
from smolfactory.callbacks.throughput import TokenThroughput

__all__ = [
    "GenerationSamples",
    "HFExport",
    "HostMemory",
    "PredictionWriter",
    "SaveOnInterrupt",
    "TaskEvaluation",
    "TokenThroughput",
]
