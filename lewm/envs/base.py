"""The one small environment interface that collection, planning and evaluation use.

An `Env` is a single (not vectorised) simulator. Actions are always *raw* actions in the env's own
units (`action_low`/`action_high`); the planner maps z-scored plans back to raw with the data set's
statistics. Pixels are (H, W, 3) uint8 at any requested size.

Data-set rows are dicts of per-row columns as written by `lewm collect` (see `lewm.data.format`):
`set_state_from_row` restores the full simulator state of a row, `set_goal_from_row` makes the state
of a (later) row the goal. Which columns carry that is each env's own business (`state_columns`).
"""
from __future__ import annotations

import abc
from typing import Callable

import numpy as np


class Env(abc.ABC):
    name: str = "env"
    action_dim: int = 2
    # columns this env writes per row in collected data (besides pixels and action), and needs back
    # to restore a row (set_state_from_row) or make it the goal (set_goal_from_row)
    state_columns: tuple[str, ...] = ("state", "proprio")
    # what a probe can regress from an embedding: name -> (column, slice of that column)
    probe_targets: dict[str, tuple[str, slice]] = {}

    def __init__(self, image_size: int = 224):
        self.image_size = image_size

    # -- core --------------------------------------------------------------------------------------
    @abc.abstractmethod
    def reset(self, seed: int | None = None) -> dict:
        """Start an episode (random start and goal under `seed`). Returns the observation dict
        {"pixels": (S, S, 3) uint8, "state": ..., "proprio": ...} at `image_size`."""

    @abc.abstractmethod
    def step(self, action: np.ndarray) -> dict:
        """Apply one raw action; returns the observation dict. Does not reset on success."""

    @abc.abstractmethod
    def render(self, size: int | None = None) -> np.ndarray:
        """(size, size, 3) uint8 frame of the current state (default `image_size`)."""

    @abc.abstractmethod
    def row(self) -> dict:
        """The current per-row columns (every name in `state_columns`), as numpy arrays."""

    @abc.abstractmethod
    def set_state_from_row(self, row: dict) -> None:
        """Restore the simulator to a data-set row (the `state_columns` of that row)."""

    @abc.abstractmethod
    def set_goal_from_row(self, row: dict) -> None:
        """Make the state recorded in `row` the goal that `success()` checks."""

    @abc.abstractmethod
    def success(self) -> bool:
        """The reference's success rule for the current state and goal."""

    def goal_errors(self) -> dict[str, float]:
        """The quantities `success()` thresholds, against the goal (e.g. {"agent_target_px": 12.5}):
        what the evaluation records as an episode's final state distance. Default: none."""
        return {}

    # -- helpers with defaults ---------------------------------------------------------------------
    def _obs(self, render: bool) -> dict:
        """The observation dict reset/step return: the row's state columns, plus the frame if asked."""
        obs = self.row()
        if render:
            obs["pixels"] = self.render()
        return obs

    @property
    def action_low(self) -> np.ndarray:
        return -np.ones(self.action_dim, np.float32)

    @property
    def action_high(self) -> np.ndarray:
        return np.ones(self.action_dim, np.float32)

    def goal_pixels(self, size: int | None = None) -> np.ndarray:
        """A frame of the goal (the env rendered at its goal state); default: not available."""
        raise NotImplementedError(f"{self.name} cannot render its goal; use the goal row's pixels")

    def close(self) -> None:
        pass


_REGISTRY: dict[str, Callable[..., Env]] = {}


def register(name: str):
    def deco(factory):
        _REGISTRY[name] = factory
        return factory
    return deco


def env_names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def make(name: str, image_size: int = 224, **kwargs) -> Env:
    """Build an environment by name (pusht, tworoom, cube, reacher)."""
    _load_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown environment '{name}' (known: {', '.join(sorted(_REGISTRY))})")
    try:
        return _REGISTRY[name](image_size=image_size, **kwargs)
    except ModuleNotFoundError as e:  # the simulators are imported when an env is built
        if e.name and e.name.split(".")[0] == "lewm":
            raise
        raise _missing_error(name, e) from None


def _load_all() -> None:
    # Importing each module registers it; an env whose simulator package is missing is skipped here
    # and reported by make() as unknown only if its module failed to import for that reason.
    import importlib
    for mod in ("tworoom", "pusht", "cube", "reacher"):
        try:
            importlib.import_module(f"lewm.envs.{mod}")
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("lewm.envs"):
                continue
            _REGISTRY.setdefault(mod, _missing(mod, e))


def _missing_error(env: str, err: Exception) -> Exception:
    from ..errors import UserError
    return UserError(f"environment '{env}' needs the package '{getattr(err, 'name', None) or err}', which is "
                     "not installed; install the simulators with: pip install 'lewm[envs]' "
                     "(pip install -e '.[envs]' in a clone)")


def _missing(mod: str, err: Exception):
    def factory(**kwargs):
        raise _missing_error(mod, err)
    return factory
