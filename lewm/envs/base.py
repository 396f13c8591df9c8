"""The one small environment interface that collection, planning and evaluation use.

An `Env` is a single (not vectorised) simulator. Actions are always *raw* actions in the env's own
units (`action_low`/`action_high`); the planner maps z-scored plans back to raw with the data set's
statistics. Pixels are (H, W, 3) uint8 at any requested size.

Data-set rows are dicts of per-row columns as written by `lewm collect` (see `lewm.data.format`):
`set_state_from_row` restores the full simulator state of a row, `set_goal_from_row` makes the state
of a (later) row the goal. Which columns carry that is each env's own business (`state_columns`).

An environment is one file in this folder: an `Env` subclass decorated with `@register("name")` that
also names what the rest of the engine needs to know about it, as class attributes and methods:

    policies        {"name": Policy subclass} for `lewm collect` (the first is the default)
    probe_targets   {"name": (column, slice[, transform])} for `lewm probe` (transform "sincos": angles)
    state_columns   the per-row columns it writes and restores
    teleport(), recolour(), visual_doc, physical_doc, default_min_distance   for `lewm surprise`

Every module of this folder is imported by the registry (`env_names()`), so a new file is found
without editing any list (docs/environments.md: "to add an environment, write one file").
"""
from __future__ import annotations

import abc
import contextlib
import os
from typing import Callable

import numpy as np

from ..errors import UserError


# -- data-collection policies ----------------------------------------------------------------------
class Policy:
    """A data-collection policy for one env: reset at the start of each episode with the episode's
    random generator (`policy.reset(rng)`, after `env.reset`), called for one raw action (`policy()`),
    reading the env's current state. `noise`: the standard deviation of Gaussian noise added to the
    scripted action (raw action units) before clipping to the action box; `default_noise` per policy."""
    name = "policy"
    default_noise = 0.0

    def __init__(self, env: "Env", noise: float | None = None):
        self.env = env
        self.noise = float(self.default_noise if noise is None else noise)
        if not np.isfinite(self.noise) or self.noise < 0:
            raise ValueError(f"noise must be a non-negative number, got {noise!r}")
        self.rng = np.random.default_rng(0)

    def reset(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def act(self) -> np.ndarray:
        raise NotImplementedError

    def __call__(self) -> np.ndarray:
        a = np.asarray(self.act(), np.float64)
        if self.noise > 0:
            a = a + self.rng.normal(0.0, self.noise, a.shape)
        return np.clip(a, self.env.action_low, self.env.action_high).astype(np.float32)

    def after_step(self) -> None:
        """Hook called after each env step (e.g. a new target once the oracle is done)."""


class RandomPolicy(Policy):
    """Uniform over the action box (the reference's Reacher data)."""
    name = "random"

    def act(self) -> np.ndarray:
        return self.rng.uniform(self.env.action_low, self.env.action_high)


# -- helpers for perturbations (lewm surprise) -----------------------------------------------------------
def swap_red_green(frames: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 frames with the R and G channels swapped (red <-> green; greys unchanged)."""
    return frames[..., [1, 0, 2]]


def far_enough(a, b, d) -> bool:
    return float(np.linalg.norm(np.asarray(a, float) - np.asarray(b, float))) >= d


def sample_until(rng, sample, ok, what: str, tries: int = 10_000):
    """The first of up to `tries` draws `sample()` that passes `ok`; UserError if none does."""
    for _ in range(tries):
        x = sample()
        if ok(x):
            return x
    raise UserError(f"could not place the teleported {what} (try a smaller --min-distance)")


def copy_row(row: dict) -> dict:
    return {k: np.array(v, dtype=float, copy=True) for k, v in row.items()}


class Env(abc.ABC):
    name: str = "env"
    action_dim: int = 2
    # columns this env writes per row in collected data (besides pixels and action), and needs back
    # to restore a row (set_state_from_row) or make it the goal (set_goal_from_row)
    state_columns: tuple[str, ...] = ("state", "proprio")
    # what a probe can regress from an embedding: name -> (column, slice of that column[, transform]),
    # transform "sincos": the values are angles, probed as (sin, cos) (lewm.evals.probe.TRANSFORMS)
    probe_targets: dict[str, tuple] = {}
    # data-collection policies: name -> Policy subclass; the first is `lewm collect`'s default
    policies: dict[str, type[Policy]] = {"random": RandomPolicy}
    # lewm surprise: what the visual and the physical perturbation do (physical_doc None: no teleport)
    visual_doc: str = "R and G channels swapped in the frames from t0 (the data set's pixels)"
    physical_doc: str | None = None
    default_min_distance: float = 0.0

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

    # -- perturbations (lewm surprise) ----------------------------------------------------------------
    def teleport(self, row: dict, rng: np.random.Generator, min_distance: float) -> dict:
        """A modified copy of data-set `row` with an object moved at random (at least `min_distance`
        from where it was), restored with set_state_from_row: the physical perturbation."""
        raise NotImplementedError(f"{self.name} defines no physical perturbation")

    def recolour(self) -> contextlib.AbstractContextManager | None:
        """A context manager under which `render` draws the scene with an object recoloured (the
        visual perturbation), or None when `recolour_frames` does it on the pixels."""
        return None

    def recolour_frames(self, frames: np.ndarray) -> np.ndarray:
        return swap_red_green(frames)


_REGISTRY: dict[str, Callable[..., Env]] = {}


def register(name: str):
    """Class decorator: make an Env subclass buildable by `name` (`make(name)`)."""
    def deco(factory):
        _REGISTRY[name] = factory
        return factory
    return deco


def env_names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def env_class(name: str):
    """The registered Env class of `name` (None for an unknown name or one whose module did not import)."""
    _load_all()
    cls = _REGISTRY.get(name)
    return cls if isinstance(cls, type) and issubclass(cls, Env) else None


def make(name: str, image_size: int = 224, **kwargs) -> Env:
    """Build an environment by name (env_names(): tworoom, pusht, cube, reacher, ...)."""
    _load_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown environment '{name}' (known: {', '.join(sorted(_REGISTRY))})")
    try:
        return _REGISTRY[name](image_size=image_size, **kwargs)
    except ModuleNotFoundError as e:  # the simulators are imported when an env is built
        if e.name and e.name.split(".")[0] == "lewm":
            raise
        raise _missing_error(name, e) from None


def policy_names(env_name: str) -> list[str]:
    """Policies available for an env; the first is the default."""
    cls = env_class(env_name)
    return list(cls.policies) if cls is not None else ["random"]


def make_policy(env: Env, name: str | None = None, noise: float | None = None) -> Policy:
    """Build policy `name` (default: the env's first) for `env`. Raises ValueError on an unknown name."""
    table = type(env).policies
    name = name or next(iter(table))
    if name not in table:
        raise ValueError(f"unknown policy '{name}' for environment '{env.name}' (known: {', '.join(table)})")
    return table[name](env, noise)


_NOT_ENVS = {"base", "mujoco_render"}


_LOADED = False


def _load_all() -> None:
    # Importing each module of this folder registers its env (once per process); a module that fails to
    # import for a missing package is registered as a factory that raises the install hint when built.
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import importlib
    import pkgutil
    for m in pkgutil.iter_modules([os.path.dirname(__file__)]):
        mod = m.name
        if mod in _NOT_ENVS or mod.startswith("_"):
            continue
        try:
            importlib.import_module(f"lewm.envs.{mod}")
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("lewm.envs"):
                continue
            _REGISTRY.setdefault(mod, _missing(mod, e))


def _missing_error(env: str, err: Exception) -> Exception:
    return UserError(f"environment '{env}' needs the package '{getattr(err, 'name', None) or err}', which is "
                     "not installed; install the simulators with: pip install 'lewm[envs]' "
                     "(pip install -e '.[envs]' in a clone)")


def _missing(mod: str, err: Exception):
    def factory(**kwargs):
        raise _missing_error(mod, err)
    return factory
