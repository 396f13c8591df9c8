"""Environments behind one small interface (`lewm.envs.base.Env`), built by name:

    env = lewm.envs.make("tworoom", image_size=64)   # env_names(): tworoom, pusht, cube, reacher
    obs = env.reset(seed=0)                          # {"pixels": (64, 64, 3) uint8, <state columns>}
    obs = env.step(env.action_low * 0)               # one raw action
    policy = lewm.envs.make_policy(env)              # the env's default data-collection policy

Each environment is one file of this folder: its class carries its policies, probe targets, state
columns and perturbations (lewm/envs/base.py). The environments, their actions, state columns and
success rules are described in docs/environments.md.
"""
from .base import Env, Policy, RandomPolicy, env_class, env_names, make, make_policy, policy_names, register

__all__ = ["Env", "Policy", "RandomPolicy", "make", "make_policy", "policy_names", "register", "env_names",
           "env_class"]
