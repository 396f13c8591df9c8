"""Environments behind one small interface (`lewm.envs.base.Env`), built by name:

    env = lewm.envs.make("tworoom", image_size=64)   # tworoom, pusht, cube, reacher
    obs = env.reset(seed=0)                          # {"pixels": (64, 64, 3) uint8, <state columns>}
    obs = env.step(env.action_low * 0)               # one raw action

Scripted data-collection policies are in `lewm.envs.policies` (`make_policy`). The environments,
their actions, state columns and success rules are described in docs/environments.md.
"""
from .base import Env, env_names, make, register

__all__ = ["Env", "make", "register", "env_names"]
