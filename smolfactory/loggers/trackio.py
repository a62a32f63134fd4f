"""TrackioLogger: Lightning metrics and hyper-parameters to Trackio, local-first experiment tracking.

Runs are written to a SQLite file under ``$TRACKIO_DIR`` (default ``~/.cache/huggingface/trackio``);
``trackio show`` opens the dashboard. With ``space_id`` they sync to a Hugging Face Space instead.

    trainer:
      logger:
        class_path: smolfactory.loggers.TrackioLogger
        init_args: {project: quill}
"""

from __future__ import annotations

import dataclasses
import importlib.util
from argparse import Namespace
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.loggers.logger import Logger, rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from smolfactory.errors import SmolFactoryError


class TrackioLogger(Logger):
    def __init__(self, project: str = "smolfactory", name: str | None = None, space_id: str | None = None) -> None:
        """Log to Trackio (pip install trackio).

        Args:
            project: Trackio project; runs of the same project are compared in one dashboard.
            name: Run name; null lets Trackio choose one.
            space_id: Hugging Face Space (owner/name) to log to instead of the local database.
        """
        super().__init__()
        if importlib.util.find_spec("trackio") is None:
            raise SmolFactoryError("TrackioLogger needs the trackio package: pip install trackio")
        self._project, self._name, self._space_id = project, name, space_id
        self._run: Any = None

    @property
    def name(self) -> str:
        return self._project

    @property
    def version(self) -> str | None:
        return self._run.name if self._run is not None else self._name

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        """The Trackio run, started on first use (on rank 0 only)."""
        if self._run is None:
            self._start({})
        return self._run

    def _start(self, config: dict[str, Any]) -> None:
        import trackio

        self._run = trackio.init(project=self._project, name=self._name, space_id=self._space_id, config=config)

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        # Lightning logs the hyper-parameters before the first metric: they become the run's config.
        config = flat_config(vars(params) if isinstance(params, Namespace) else params)
        if self._run is None:
            self._start(config)
        else:
            self._run.config.update(config)

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.experiment.log(dict(metrics), step=step)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._run is not None:
            self._run.finish()


def flat_config(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as one flat dict of plain values: ``{"lora": LoraSettings(r=4)}`` -> ``{"lora/r": 4}``.

    Mappings, dataclasses and namespaces are flattened with "/" between the keys (as Lightning's loggers do);
    values other than None, bool, int, float and str become their ``str``, so that Trackio can store them.
    """
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        elif isinstance(value, Namespace):
            value = vars(value)
        if isinstance(value, Mapping):
            flat.update(flat_config(value, f"{name}/"))
        else:
            flat[name] = value if value is None or isinstance(value, bool | int | float | str) else str(value)
    return flat
