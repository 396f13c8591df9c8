"""The reference planner: the Cross-Entropy Method in latent space, plain eager PyTorch.

Written to read like the paper (and kept as the oracle for the fast planner, `engine.FastPlanner`):

    z0 = enc(start frame), zg = enc(goal frame)
    mean = 0, std = var_scale                       (z-scored action space, (H, frameskip*A))
    repeat `iterations` times:
        candidates = mean + std * N(0, 1)           (samples of them; candidate 0 = mean)
        cost = || rollout(z0, candidate)[-1] - zg ||^2      (terminal step only)
        elites = the `elites` cheapest candidates
        mean, std = elites.mean(), elites.std()     (unbiased std)
    plan = mean

The rollout is the model's autoregressive predictor over a sliding window of <= history frames.
`reencode=True` reproduces what the reference system paid: start and goal are encoded again at every
iteration (its cost function did that), which benchmarks use as the "reference cost" baseline.

Many environments are planned in one call: every tensor carries a leading E (environments) axis.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..model import LeWM


@dataclass
class PlanResult:
    actions: torch.Tensor  # (E, H, frameskip*A) the plan in the z-scored macro-action space
    raw_actions: torch.Tensor  # (E, H*frameskip, A) the same plan as raw env actions
    cost: torch.Tensor  # (E,) predicted cost of the final mean (candidate 0 of the last iteration)


def _in_eval_mode(plan):
    """Wrap a planner's `plan`: the model plans in eval mode (BatchNorm running statistics, no dropout)
    and is left in the mode the caller had it in."""
    @functools.wraps(plan)
    def wrapped(self, *args, **kwargs):
        was = self.model.training
        self.model.eval()
        try:
            return plan(self, *args, **kwargs)
        finally:
            if was:
                self.model.train(True)
    return wrapped


class Planner:
    """Shared by every planner: input checks, encoding, noise, and mapping plans to raw actions.

    plan(start, goal) with start/goal (E, H, W, 3) uint8 frames (or one (H, W, 3) frame each);
    `noise` (iterations, E, samples, horizon, frameskip*A) makes the random draws explicit so two
    planners (or one env vs a batch) can be compared on identical draws."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "plan" in cls.__dict__:
            cls.plan = _in_eval_mode(cls.__dict__["plan"])

    def __init__(self, model: LeWM, samples: int = 300, elites: int = 30, iterations: int = 30,
                 horizon: int = 5, var_scale: float = 1.0, seed: int | None = 42):
        if elites > samples:
            raise ValueError(f"elites ({elites}) must be <= samples ({samples})")
        if min(samples, elites, iterations, horizon) <= 0:
            raise ValueError("samples, elites, iterations and horizon must be positive")
        self.model = model  # put in eval mode only while planning (plan), then as it was
        self.goal_cost = None  # None: squared L2 to the goal latent; else a reach.GoalCost
        self.init = None  # None: CEM's first mean is 0; else an IDM head on the model's device (idm.py)
        self.samples, self.elites, self.iterations, self.horizon = samples, elites, iterations, horizon
        self.var_scale = var_scale
        self.generator = None
        self.seed = seed
        m = model.cfg.model
        self.frameskip, self.action_dim, self.width = m.frameskip, m.action_dim, m.action_input_dim

    @classmethod
    def from_config(cls, model: LeWM, **overrides):
        p = model.cfg.plan
        kw = dict(samples=p.samples, elites=p.elites, iterations=p.iterations, horizon=p.horizon,
                  var_scale=p.var_scale, seed=p.seed)
        kw.update(overrides)
        return cls(model, **kw)

    @property
    def device(self) -> torch.device:
        return self.model.action_mean.device

    def noise_shape(self, n_envs: int) -> tuple:
        return (self.iterations, n_envs, self.samples, self.horizon, self.width)

    def _rng(self) -> torch.Generator:
        """The planner's generator on its device, seeded once (with `seed`) at its first use."""
        if self.generator is None:
            self.generator = torch.Generator(device=self.device)
            if self.seed is not None:
                self.generator.manual_seed(self.seed)
        return self.generator

    def draw_noise(self, n_envs: int) -> torch.Tensor:
        """All the normal draws of one plan, from the planner's generator."""
        return torch.randn(self.noise_shape(n_envs), generator=self._rng(), device=self.device)

    @staticmethod
    def _frames(x: torch.Tensor, name: str) -> torch.Tensor:
        if not torch.is_tensor(x):
            x = torch.as_tensor(x)
        if x.dim() == 3:
            x = x[None]
        if x.dim() != 4 or x.shape[-1] != 3:
            raise ValueError(f"{name} must be (E, H, W, 3) or (H, W, 3) frames, got {tuple(x.shape)}")
        return x

    def _inputs(self, start, goal, noise):
        start, goal = self._frames(start, "start"), self._frames(goal, "goal")
        if start.shape[0] != goal.shape[0]:
            raise ValueError(f"start ({start.shape[0]}) and goal ({goal.shape[0]}) hold different numbers of envs")
        E = start.shape[0]
        if noise is None:
            noise = self.draw_noise(E)
        elif tuple(noise.shape) != self.noise_shape(E):
            raise ValueError(f"noise must have shape {self.noise_shape(E)}, got {tuple(noise.shape)}")
        return start, goal, noise.to(self.device)

    def initial_mean(self, z0: torch.Tensor, zg: torch.Tensor) -> torch.Tensor:
        """(E, H, Wd) the sampling mean of the first iteration: 0, or the proposal of `self.init` (an
        IDM head, lewm/plan/idm.py: `init="idm"`), which is also candidate 0 of the first iteration."""
        if self.init is None:
            return torch.zeros(z0.shape[0], self.horizon, self.width, device=z0.device)
        return self.init(z0.float(), zg.float()).float()

    def to_raw(self, plan: torch.Tensor) -> torch.Tensor:
        """(E, H, frameskip*A) z-scored -> (E, H*frameskip, A) raw actions."""
        E = plan.shape[0]
        return self.model.denormalize_actions(plan.reshape(E, self.horizon * self.frameskip, self.action_dim))

    def plan(self, start, goal, noise: torch.Tensor | None = None) -> PlanResult:
        raise NotImplementedError


def candidate_context(z0: torch.Tensor, samples: int) -> torch.Tensor:
    """(E, D) start latents -> (E * samples, 1, D): each env's start as the one-frame context of each of
    its candidates (a view, no copy until the predictor reads it)."""
    E, D = z0.shape
    return z0[:, None, :].expand(E, samples, D).reshape(E * samples, 1, D)


def terminal_cost(model: LeWM, z0: torch.Tensor, zg: torch.Tensor, candidates: torch.Tensor,
                  goal_cost=None) -> torch.Tensor:
    """z0 (E, D) start latents, zg (E, D) goal latents, candidates (E, S, H, W) -> (E, S) costs:
    squared L2 between the latent after the last action and the goal latent, or `goal_cost(pred (E, S, D),
    zg)` (lewm/plan/reach.py: the reachability head, alone or mixed with L2)."""
    E, S = candidates.shape[:2]
    ctx = candidate_context(z0, S)
    pred = model.rollout(ctx, candidates.reshape(E * S, *candidates.shape[2:]))[:, -1].reshape(E, S, -1)
    if goal_cost is not None:
        return goal_cost(pred, zg)
    return (pred - zg[:, None, :]).pow(2).sum(-1)


class CEMPlanner(Planner):
    """The eager reference CEM (see the module docstring)."""

    def __init__(self, model: LeWM, samples: int = 300, elites: int = 30, iterations: int = 30,
                 horizon: int = 5, var_scale: float = 1.0, seed: int | None = 42, reencode: bool = False,
                 init=None):
        super().__init__(model, samples, elites, iterations, horizon, var_scale, seed)
        self.reencode, self.init = reencode, init

    @torch.no_grad()
    def plan(self, start, goal, noise: torch.Tensor | None = None) -> PlanResult:
        start, goal, noise = self._inputs(start, goal, noise)
        model = self.model
        z0, zg = model.encode(start), model.encode(goal)
        mean = self.initial_mean(z0, zg)
        std = torch.full_like(mean, self.var_scale)
        for it in range(self.iterations):
            if it > 0 and self.reencode:  # the reference re-encoded both frames every iteration
                z0, zg = model.encode(start), model.encode(goal)
            cand = mean[:, None] + std[:, None] * noise[it]  # (E, S, H, W)
            cand[:, 0] = mean
            cost = terminal_cost(model, z0, zg, cand, self.goal_cost)  # (E, S)
            idx = cost.topk(self.elites, dim=1, largest=False).indices  # (E, k)
            elite = torch.gather(cand, 1, idx[:, :, None, None].expand(-1, -1, self.horizon, self.width))
            mean, std = elite.mean(1), elite.std(1)
        final_cost = terminal_cost(model, z0, zg, mean[:, None], self.goal_cost)[:, 0]
        return PlanResult(mean, self.to_raw(mean), final_cost)
