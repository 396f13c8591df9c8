"""PushT on gym-pusht (`gym_pusht/PushT-v0`: pymunk physics, pygame drawing offscreen).

Coordinates are gym-pusht's 512x512 world (pixels of its 512 px drawing; y down in the image).

Action (RELATIVE, our convention): a in [-1,1]^2 (clipped) moves the agent's PD target to
    target = agent position + 50 * a      (ACTION_SCALE = 50 px), clipped to [0, 512]^2,
and gym-pusht's PD controller (k_p=100, k_v=20, 10 substeps of 10 ms) tracks it for one step
(0.1 s). From rest a = (1, 0) moves the agent ~13 px in one step; held, ~25 px/step. gym-pusht's own
action is the absolute target in [0,512]^2: `to_absolute(action)` converts ours.

Row columns (float64):
    state      (5)  agent x, agent y, block x, block y, block angle (mod 2 pi): the reference's state
    proprio    (4)  agent x, agent y, agent vx, agent vy (DINO-WM's PushT proprio)
    block_vel  (3)  block vx, vy, angular velocity (needed to continue the physics exactly)
`set_state_from_row` restores all of them; `set_goal_from_row` makes the row's `state` the goal.

Success (reference, envs/pusht/env.py::eval_state): ||(agent xy, block xy)_goal - (agent xy,
block xy)|| < 20 and |wrapped block angle error| < pi/9. gym-pusht's own success (95 % coverage of
the fixed green goal T) is not used. The green T is always drawn at gym-pusht's fixed pose
(256, 256, pi/4), whatever the goal, so frames look the same as in collected data; the goal is
given to a planner as a goal image (the goal row's pixels).

reset(seed) samples the start as gym-pusht does (agent in [50,450)^2 and block in [100,400)^2 on
integers, angle uniform in [-pi,pi)) and one physics step resolves overlaps; a goal state is sampled
from the same distribution (collection policies push the block towards its pose).

Frames: gym-pusht's 512 px drawing (without the contact points its debug draw adds: a frame is a
function of the state alone) resized to the requested size with cv2 INTER_AREA (gym-pusht uses
bilinear, which aliases at 64 px).
"""
from __future__ import annotations

import contextlib
import os

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

import warnings  # noqa: E402

import numpy as np  # noqa: E402

from .base import Env, Policy, RandomPolicy, copy_row, far_enough, register, sample_until  # noqa: E402

ACTION_SCALE = 50.0
WORLD = 512.0
POS_TOL = 20.0
ANGLE_TOL = np.pi / 9


def _wrap(a):
    return (np.asarray(a) + np.pi) % (2 * np.pi) - np.pi


def _make_gym_env():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import gymnasium as gym
        import gym_pusht  # noqa: F401  (registers gym_pusht/PushT-v0)
        return gym.make("gym_pusht/PushT-v0", obs_type="state", render_mode="rgb_array").unwrapped


@register("pusht")
class PushTEnv(Env):
    name = "pusht"
    action_dim = 2
    state_columns = ("state", "proprio", "block_vel")
    probe_targets = {"agent": ("state", slice(0, 2)), "block": ("state", slice(2, 4)),
                     "angle": ("state", slice(4, 5)), "angle_sc": ("state", slice(4, 5), "sincos")}
    visual_doc = "the T block is drawn orange instead of slate grey from t0 on (re-rendered by the env)"
    physical_doc = ("at t0 the block jumps to a random pose (x, y uniform in [100, 400), angle uniform), at "
                    "least --min-distance px (512 px world) from where it was and 100 px clear of the agent, at "
                    "rest; then the physics runs on with the recorded actions")
    default_min_distance = 80.0
    RECOLOUR = (255, 140, 0)
    stop_on_success = False
    default_max_steps = 150
    packages = ("gymnasium", "gym-pusht", "pymunk", "pygame", "shapely", "opencv-python",
                "opencv-python-headless")  # versions recorded in collected files
    action_doc = "a in [-1,1]^2: PD target = agent position + 50 px * a (512 px world)"

    def __init__(self, image_size: int = 224):
        super().__init__(image_size)
        self.gym = _make_gym_env()
        import cv2
        import pygame
        import pymunk
        import pymunk.pygame_util
        from gym_pusht.envs.pymunk_override import DrawOptions
        self._cv2, self._pygame, self._pymunk, self._DrawOptions = cv2, pygame, pymunk, DrawOptions
        self.gym.reset(seed=0)
        self.goal = np.array([256.0, 256.0, 256.0, 256.0, np.pi / 4])
        self._substeps = int(1 / (self.gym.dt * self.gym.control_hz))

    # -- conversions ---------------------------------------------------------------------------
    def to_absolute(self, action) -> np.ndarray:
        """Our relative action -> gym-pusht's absolute PD target in [0,512]^2."""
        a = np.clip(np.asarray(action, np.float64).reshape(2), -1.0, 1.0)
        return np.clip(np.asarray(self.gym.agent.position) + ACTION_SCALE * a, 0.0, WORLD)

    # -- Env -----------------------------------------------------------------------------------
    def reset(self, seed: int | None = None, render: bool = True) -> dict:
        rng = np.random.default_rng(seed)

        def sample():
            return np.array([rng.integers(50, 450), rng.integers(50, 450), rng.integers(100, 400),
                             rng.integers(100, 400), rng.uniform(-np.pi, np.pi)], np.float64)

        start, goal = sample(), sample()
        self.gym._setup()
        self.gym._set_state(start)  # sets the pose and runs one physics step (resolves overlaps)
        self._refresh()
        self.goal = goal
        self.goal[4] %= 2 * np.pi
        return self._obs(render)

    def step(self, action, render: bool = True) -> dict:
        a = np.asarray(action, np.float64).reshape(-1)
        if a.shape != (2,) or not np.isfinite(a).all():
            raise ValueError(f"pusht: action must be 2 finite numbers, got {action!r}")
        target = self.to_absolute(a)
        g = self.gym
        g.n_contact_points = 0
        agent = g.agent
        for _ in range(self._substeps):  # gym-pusht's step physics, without its coverage/obs work
            acc = g.k_p * (target - np.asarray(agent.position)) - g.k_v * np.asarray(agent.velocity)
            agent.velocity = tuple(np.asarray(agent.velocity) + acc * g.dt)
            g.space.step(g.dt)
        self._refresh()  # draw the bodies where they are now (pymunk caches shapes mid-step)
        return self._obs(render)

    def render(self, size: int | None = None) -> np.ndarray:
        cv2 = self._cv2
        size = int(size or self.image_size)
        screen = self._draw()
        w, h = screen.get_size()
        img = np.frombuffer(self._pygame.image.tobytes(screen, "RGB"), np.uint8).reshape(h, w, 3)
        interp = cv2.INTER_AREA if size < img.shape[0] else cv2.INTER_LINEAR
        return np.ascontiguousarray(cv2.resize(img, (size, size), interpolation=interp))

    def _draw(self):
        """gym-pusht's 512 px drawing (goal T, walls, block, agent) without the contact points its
        debug draw adds, so a frame is a function of the state alone (set_state_from_row
        reproduces it exactly)."""
        pygame, pymunk, DrawOptions = self._pygame, self._pymunk, self._DrawOptions
        g = self.gym
        screen = pygame.Surface((512, 512))
        screen.fill((255, 255, 255))
        opts = DrawOptions(screen)
        opts.flags = pymunk.SpaceDebugDrawOptions.DRAW_SHAPES
        goal_body = g.get_goal_pose_body(g.goal_pose)
        for shape in g.block.shapes:
            pts = [pymunk.pygame_util.to_pygame(goal_body.local_to_world(v), screen) for v in shape.get_vertices()]
            pygame.draw.polygon(screen, pygame.Color("LightGreen"), pts + [pts[0]])
        g.space.debug_draw(opts)
        return screen

    def goal_pixels(self, size: int | None = None) -> np.ndarray:
        saved = self.row()
        self._set(self.goal[:2], (0, 0), self.goal[2:4], self.goal[4], (0, 0), 0.0)
        try:
            return self.render(size)
        finally:
            self.set_state_from_row(saved)

    def row(self) -> dict:
        g = self.gym
        return {
            "state": np.array([*g.agent.position, *g.block.position, g.block.angle % (2 * np.pi)]),
            "proprio": np.array([*g.agent.position, *g.agent.velocity]),
            "block_vel": np.array([*g.block.velocity, g.block.angular_velocity]),
        }

    def _set(self, agent_xy, agent_v, block_xy, angle, block_v, omega) -> None:
        g = self.gym
        g.agent.position = tuple(map(float, agent_xy))
        g.agent.velocity = tuple(map(float, agent_v))
        # angle first: pymunk rotates about the centre of gravity, so setting the angle after the
        # position would move the body origin that `state` records (gym-pusht's _set_state does that)
        g.block.angle = float(angle)
        g.block.position = tuple(map(float, block_xy))
        g.block.velocity = tuple(map(float, block_v))
        g.block.angular_velocity = float(omega)
        self._refresh()

    def _refresh(self) -> None:
        """Recompute the shapes' cached world geometry (drawing uses it) from the bodies' poses."""
        g = self.gym
        for body in (g.agent, g.block):
            for shape in body.shapes:
                shape.cache_bb()
            g.space.reindex_shapes_for_body(body)

    def set_state_from_row(self, row: dict) -> None:
        s = np.asarray(row["state"], np.float64).reshape(-1)
        p = np.asarray(row["proprio"], np.float64).reshape(-1) if "proprio" in row else np.r_[s[:2], 0, 0]
        bv = np.asarray(row["block_vel"], np.float64).reshape(-1) if "block_vel" in row else np.zeros(3)
        self._set(s[:2], p[2:4], s[2:4], s[4], bv[:2], bv[2])

    def set_goal_from_row(self, row: dict) -> None:
        self.goal = np.asarray(row["state"], np.float64).reshape(-1)[:5].copy()

    def errors(self) -> tuple[float, float]:
        """(position error over agent xy + block xy, |wrapped angle error|) against the goal."""
        s = self.row()["state"]
        return float(np.linalg.norm(self.goal[:4] - s[:4])), float(abs(_wrap(self.goal[4] - s[4])))

    def goal_errors(self) -> dict[str, float]:
        pos, ang = self.errors()
        return {"position": pos, "angle_rad": ang}

    def success(self) -> bool:
        pos, ang = self.errors()
        return pos < POS_TOL and ang < ANGLE_TOL


    def teleport(self, row, rng, min_distance):
        s = np.asarray(row["state"], float).reshape(-1).copy()
        agent, old = s[:2], s[2:4]
        xy = sample_until(rng, lambda: rng.uniform(100.0, 400.0, 2),
                          lambda q: far_enough(q, old, min_distance) and far_enough(q, agent, 100.0), "block")
        s[2:4] = xy
        s[4] = rng.uniform(0.0, 2 * np.pi)
        out = copy_row(row)
        out["state"] = s
        out["block_vel"] = np.zeros(3)
        return out

    @contextlib.contextmanager
    def _recolour(self):
        import pygame
        shapes = list(self.gym.block.shapes)
        old = [s.color for s in shapes]
        try:
            for s in shapes:
                s.color = pygame.Color(*self.RECOLOUR)
            yield
        finally:
            for s, c in zip(shapes, old):
                s.color = c

    def recolour(self):
        return self._recolour()


# -- the scripted pusher ---------------------------------------------------------------------------
# Contact candidates on the T's outline in body coordinates: (point, outward normal). The T is a
# 120x30 bar (x in [-60,60], y in [0,30]) and a 30x90 stem (x in [-15,15], y in [30,120]).
def _candidates():
    pts = []
    for x in (-45.0, -15.0, 15.0, 45.0):
        pts.append(((x, 0.0), (0.0, -1.0)))          # top of the bar
    for x in (-45.0, 45.0):
        pts.append(((x, 30.0), (0.0, 1.0)))          # underside of the bar, beside the stem
    pts += [((-60.0, 15.0), (-1.0, 0.0)), ((60.0, 15.0), (1.0, 0.0))]  # bar ends
    for y in (55.0, 95.0):
        pts += [((-15.0, y), (-1.0, 0.0)), ((15.0, y), (1.0, 0.0))]    # stem sides
    pts.append(((0.0, 120.0), (0.0, 1.0)))           # stem end
    p = np.array([c[0] for c in pts])
    n = np.array([c[1] for c in pts])
    return p, n


_CAND_P, _CAND_N = _candidates()
_AGENT_R = 15.0
_BLOCK_CLEAR = 85.0  # radius around the block's centre the agent routes around
_REACH_LO, _REACH_HI = 25.0, 487.0  # where the agent's centre can go (walls at 5 and 506, radius 15)


def _rot(theta):
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, -s], [s, c]])


class PushTPusher(Policy):
    """Scripted pusher: pick the contact point on the T whose goal-pose image is farthest along the
    direction it can be pushed (into its face), go around the block to stand behind that face,
    then push through it for a few steps; repeat. Rotation errors are corrected because the points
    far from the centre move most when the angle is off. Gaussian noise (default 0.3, i.e. 15 px of
    target) is added to every action so the data covers varied contacts and block motion."""
    name = "pusher"
    default_noise = 0.3
    PUSH_STEPS = 6
    PUSH_DEPTH = 40.0

    def reset(self, rng):
        super().reset(rng)
        self.phase, self.k, self.count = "choose", -1, 0

    def _world(self, pose):
        R = _rot(pose[2])
        return pose[:2] + _CAND_P @ R.T, _CAND_N @ R.T

    def _choose(self, block, goal):
        p, n = self._world(block)
        pg, _ = self._world(goal)
        score = np.einsum("ij,ij->i", pg - p, -n)
        pre = p + n * (_AGENT_R + 10.0)
        reachable = ((pre > _REACH_LO) & (pre < _REACH_HI)).all(axis=1)
        if not reachable.any():
            return -1, 0.0
        noisy = np.where(reachable, score + self.rng.normal(0, 5.0, score.shape), -np.inf)
        if self.k >= 0 and self.phase == "stuck":
            noisy[self.k] = -np.inf if reachable.sum() > 1 else noisy[self.k]
        k = int(np.argmax(noisy))
        return k, float(score[k])

    def act(self) -> np.ndarray:
        env: PushTEnv = self.env
        s = env.row()["state"]
        agent, block = s[:2], s[2:5]
        goal = env.goal[2:5]
        if self.phase in ("choose", "stuck") or self.k < 0:
            self.k, score = self._choose(block, goal)
            self.phase, self.count = "approach", 0
            if self.k < 0 or score < 2.0:  # at its goal (or unreachable): go to the goal agent position
                self.phase = "idle"
        p, n = self._world(block)
        pk, nk = p[self.k], n[self.k]
        centre = block[:2] + _rot(block[2]) @ np.array([0.0, 45.0])
        if self.phase == "idle":
            self.phase = "choose"
            return self._towards(agent, env.goal[:2])
        if self.phase == "approach":
            pre = pk + nk * (_AGENT_R + 10.0)
            if np.linalg.norm(pre - agent) < 8.0:
                self.phase = "push"
            else:
                self.count += 1
                if self.count > 25:  # stuck: pick another contact
                    self.phase = "stuck"
                return self._towards(agent, self._route(agent, pre, centre))
        # push: drive through the contact point along the inward normal
        self.count += 1
        if self.count > self.PUSH_STEPS:
            self.phase = "choose"
        return self._towards(agent, pk - nk * self.PUSH_DEPTH)

    @staticmethod
    def _towards(agent, w):
        return np.clip((w - agent) / ACTION_SCALE, -1.0, 1.0)

    @staticmethod
    def _route(agent, pre, centre):
        """Waypoint towards `pre` that goes around the block's disc instead of through it."""
        d = pre - agent
        L = float(np.linalg.norm(d))
        if L < 1e-6:
            return pre
        t = np.clip(np.dot(centre - agent, d) / (L * L), 0.0, 1.0)
        closest = agent + t * d
        if np.linalg.norm(closest - centre) >= _BLOCK_CLEAR or np.linalg.norm(pre - agent) < 30:
            return pre
        # step tangentially around the disc, on the side of the shorter arc to `pre`
        ra, rp = agent - centre, pre - centre
        ang_a, ang_p = np.arctan2(ra[1], ra[0]), np.arctan2(rp[1], rp[0])
        step = np.sign(_wrap(ang_p - ang_a)) * 0.6
        r = max(_BLOCK_CLEAR + 10.0, float(np.linalg.norm(ra)))
        a2 = ang_a + step
        return np.clip(centre + r * np.array([np.cos(a2), np.sin(a2)]), _REACH_LO, _REACH_HI)


def _pose_error(pose, goal) -> float:
    """Block pose error in px: position error + 60 px per radian of wrapped angle error (a point at
    the end of the T's bar, 60 px from its origin, moves 60 px per radian)."""
    return float(np.linalg.norm(goal[:2] - pose[:2]) + 60.0 * abs(_wrap(goal[2] - pose[2])))


class PushTExpert(PushTPusher):
    """State-based planning over push primitives, with the simulator: at each decision every reachable
    contact point on the T (see `_candidates`) and three push lengths are tried in the env's own
    physics from the saved state (the agent placed behind the contact, at rest), and the push with the
    most reduction of the block's pose error (`_pose_error`) per step spent (approach distance at
    ~20 px/step plus the push) is run for real: approach around the block, then push. Once the block
    is within 6 px and 0.1 rad of its goal pose the agent parks at its goal position. The state is
    restored after planning, so the episode's physics is the env's. Success: `PushTEnv.success`
    (README, Results, for the measured rate). Collection noise (default 0.1, 5 px of target) varies
    the contacts and block motion."""
    name = "expert"
    default_noise = 0.1
    PUSHES = ((2, 15.0), (4, 30.0), (8, 40.0))  # (steps, depth behind the contact, px)
    DONE_POS, DONE_ANG = 6.0, 0.1

    def reset(self, rng):
        super().reset(rng)
        self.plan = None  # (contact index, steps, depth)

    def _simulate(self, saved, pre, k, steps, depth):
        env = self.env
        s = saved["state"]
        env._set(pre, (0.0, 0.0), s[2:4], s[4], saved["block_vel"][:2], saved["block_vel"][2])
        for _ in range(steps):
            st = env.row()["state"]
            p, n = self._world(st[2:5])
            env.step(self._towards(st[:2], p[k] - n[k] * depth), render=False)
        return env.row()["state"][2:5]

    def _choose_push(self):
        env = self.env
        saved = env.row()
        s = saved["state"]
        agent, block, goal = s[:2], s[2:5], env.goal[2:5]
        base = _pose_error(block, goal)
        p, n = self._world(block)
        pres = p + n * (_AGENT_R + 10.0)
        centre = block[:2] + _rot(block[2]) @ np.array([0.0, 45.0])
        best, best_score = None, 0.0
        try:
            for k in range(len(p)):
                if not ((pres[k] > _REACH_LO) & (pres[k] < _REACH_HI)).all():
                    continue
                stage = np.clip(pres[k] + n[k] * self.STAGE, _REACH_LO, _REACH_HI)
                dist = float(np.linalg.norm(stage - agent)) + self.STAGE
                if self._around(agent, stage, centre) is not stage:
                    dist += self.CLEAR  # goes around the block
                for steps, depth in self.PUSHES:
                    after = self._simulate(saved, pres[k], k, steps, depth)
                    score = (base - _pose_error(after, goal)) / (steps + dist / 20.0)
                    if score > best_score:
                        best, best_score = (k, steps, depth), score
        finally:
            env.set_state_from_row(saved)
        return best

    STAGE = 60.0      # the staging point: this far out along the contact's normal from its push point
    CLEAR = 100.0     # radius around the T's centre the agent circles at (T within 77 px, agent 15)

    def act(self) -> np.ndarray:
        env: PushTEnv = self.env
        s = env.row()["state"]
        agent, block, goal = s[:2], s[2:5], env.goal[2:5]
        centre = block[:2] + _rot(block[2]) @ np.array([0.0, 45.0])
        if (np.linalg.norm(goal[:2] - block[:2]) < self.DONE_POS
                and abs(_wrap(goal[2] - block[2])) < self.DONE_ANG):
            self.plan = None
            return self._towards(agent, self._around(agent, env.goal[:2], centre))
        if self.plan is None:
            self.plan = self._choose_push()
            self.phase, self.count = "stage", 0
            if self.plan is None:  # no push helps from here: a random nudge
                return self.rng.uniform(-1.0, 1.0, 2)
        k, steps, depth = self.plan
        p, n = self._world(block)
        pre = p[k] + n[k] * (_AGENT_R + 10.0)
        self.count += 1
        if self.phase in ("stage", "insert") and self.count > 40:  # stuck on the way: plan again
            self.plan = None
            return self.rng.uniform(-1.0, 1.0, 2)
        if self.phase == "stage":
            stage = np.clip(pre + n[k] * self.STAGE, _REACH_LO, _REACH_HI)
            if np.linalg.norm(stage - agent) < 12.0:
                self.phase = "insert"
            else:
                return self._towards(agent, self._around(agent, stage, centre))
        if self.phase == "insert":
            if np.linalg.norm(pre - agent) < 8.0:
                self.phase, self.count = "push", 0
            else:
                return self._towards(agent, pre)
        if self.count >= steps:
            self.plan = None
        return self._towards(agent, p[k] - n[k] * depth)

    def _around(self, agent, target, centre):
        """Waypoint towards `target` that keeps the agent outside the disc of radius CLEAR around the
        T's centre: straight when the segment is clear, else along the circle (the shorter way), and
        straight in once the agent is at the target's bearing."""
        R = self.CLEAR
        ra = agent - centre
        da = float(np.linalg.norm(ra))
        if da < R - 10.0 and np.linalg.norm(target - agent) > 30.0:
            rt = target - centre
            if np.dot(ra, rt) > 0.9 * da * np.linalg.norm(rt):  # already on the target's side
                return target
            return np.clip(centre + ra / max(da, 1e-6) * (R + 10.0), _REACH_LO, _REACH_HI)
        d = target - agent
        L2 = float(d @ d)
        if L2 < 1e-9:
            return target
        t = np.clip(np.dot(centre - agent, d) / L2, 0.0, 1.0)
        if np.linalg.norm(agent + t * d - centre) >= R - 10.0:
            return target
        rt = target - centre
        diff = float(_wrap(np.arctan2(rt[1], rt[0]) - np.arctan2(ra[1], ra[0])))
        if abs(diff) < 0.3:
            return target
        a2 = np.arctan2(ra[1], ra[0]) + np.sign(diff) * min(0.6, abs(diff))
        return np.clip(centre + (R + 10.0) * np.array([np.cos(a2), np.sin(a2)]), _REACH_LO, _REACH_HI)


PushTEnv.policies = {"expert": PushTExpert, "pusher": PushTPusher, "random": RandomPolicy}  # the first is the default
