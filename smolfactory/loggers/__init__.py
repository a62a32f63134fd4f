"""Lightning loggers that Lightning does not ship."""

from smolfactory.loggers.trackio import TrackioLogger

__all__ = ["TrackioLogger"]
