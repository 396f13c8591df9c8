"""Data-collection policies: scripted experts with privileged access to the simulator, and random.

A policy is built for one env (`make_policy(env, name, noise)`), reset at the start of each
episode with the episode's random generator (`policy.reset(rng)`, after `env.reset`), and called
for one raw action (`policy()`), reading the env's current state. `noise` is the standard deviation
of Gaussian noise added to the scripted action (in raw action units) before clipping to the action
box; each policy has its documented default.

    env name  policies (default first)          default noise
    tworoom   expert, random                    2.0 (reference: ExpertPolicy(action_noise=2.0))
    pusht     pusher, random                    0.3
    cube      oracle, random                    0.1 (reference: OGBench markov oracle, noise 0.1)
    reacher   random, expert                    0.0 for random; 0.3 for expert
"""
from __future__ import annotations

import numpy as np

from .base import Env


class Policy:
    name = "policy"
    default_noise = 0.0

    def __init__(self, env: Env, noise: float | None = None):
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


# -- TwoRoom ---------------------------------------------------------------------------------------
class TwoRoomExpert(Policy):
    """Door-seeking expert (reference.md section 9): if the target is in the other room, head for
    the door centre (112, 49) until within 10.5 px of it, then head for the target; the action is
    the unit vector towards the waypoint."""
    name = "expert"
    default_noise = 2.0

    def act(self) -> np.ndarray:
        from . import tworoom as T
        agent, target = self.env.agent, self.env.target
        waypoint = target
        if (agent[0] > T.WALL_CENTER) != (target[0] > T.WALL_CENTER):
            door = np.array([T.WALL_CENTER, T.DOOR_CENTER])
            if np.linalg.norm(door - agent) > T.DOOR_REACH:
                waypoint = door
        d = waypoint - agent
        n = float(np.linalg.norm(d))
        return d / n if n > 1e-8 else np.zeros(2)


# -- registry --------------------------------------------------------------------------------------
def _pusht():
    from .pusht import PushTPusher
    return {"pusher": PushTPusher, "random": RandomPolicy}


def _cube():
    from .cube import CubeOracle
    return {"oracle": CubeOracle, "random": RandomPolicy}


def _reacher():
    from .reacher import ReacherExpert
    return {"random": RandomPolicy, "expert": ReacherExpert}


_TABLES = {
    "tworoom": lambda: {"expert": TwoRoomExpert, "random": RandomPolicy},
    "pusht": _pusht,
    "cube": _cube,
    "reacher": _reacher,
}


def policy_names(env_name: str) -> list[str]:
    """Policies available for an env; the first is the default."""
    table = _TABLES.get(env_name)
    return list(table()) if table else ["random"]


def make_policy(env: Env, name: str | None = None, noise: float | None = None) -> Policy:
    """Build policy `name` (default: the env's first) for `env`. Raises ValueError on an unknown name."""
    table = _TABLES[env.name]() if env.name in _TABLES else {"random": RandomPolicy}
    name = name or next(iter(table))
    if name not in table:
        raise ValueError(f"unknown policy '{name}' for environment '{env.name}' (known: {', '.join(table)})")
    return table[name](env, noise)
