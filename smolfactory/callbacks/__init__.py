"""Lightning callbacks."""

from smolfactory.callbacks.export import HFExport

__all__ = ["HFExport"]
