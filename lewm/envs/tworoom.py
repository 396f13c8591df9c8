"""TwoRoom: a point agent in two rooms joined by one door (shared/spec/reference.md section 9).

Our own numpy implementation of the reference's geometry and rules, in the coordinates of its
224x224 canvas (x to the right, y down, pixel index = coordinate):

* white background; black 4-px border lines at [10,14) and [210,214) on both axes (full lines);
* a central vertical wall x in [107,117] (inclusive), with one door: y in [35,63] (centre 49,
  half-extent 14) painted white;
* the agent is a red Gaussian blob, alpha = exp(-d^2 / (2 r^2)) normalised to max 1 over the
  pixel grid, r = 7, alpha-blended over the background and rounded to uint8 (the reference
  truncates, which leaves a faint 254-valued halo ~40 px wide; rounding does not);
* the target is not drawn; the goal image is the agent drawn at the target (`goal_pixels`).

Dynamics: action a in [-1,1]^2 (clipped), p' = p + 5 a; p' is clamped to [21,203] per axis; then,
if the agent started left of x=112 and x' > 100 while y' is outside the door span widened by 1.75
([33.25, 64.75]), x' = 99.5 (mirror from the right: x' < 124 gives x' = 124.5). Success (and the
reference's termination) is ||agent - target|| < 16.

Sampling at reset: agent and target uniform in [14,209]^2; the agent is resampled while
|x - 112| <= 5 + 7 (the wall zone). Options: `target_other_room=True` also resamples the target
until it lies in the other room and outside the wall zone, and `min_steps=k` until the path
agent -> door centre -> target takes at least k steps (the reference's Feb-2026 collector).

Rendering (`render="reference"`, the default) is the reference's: the 224 px canvas, then resized
to the requested size with PIL's bilinear filter (its AddPixels wrapper), so a 64 px data set is the
reference's 64 px data set (grey, antialiased walls). `render="direct"` draws at the requested size
instead (pixel j samples canvas coordinate (j + 0.5) * 224 / S - 0.5: crisp walls; the same at 224).

Row columns (float64, canvas pixels): `proprio` = agent (x, y); `state` = agent (x, y), target
(x, y). `set_state_from_row` restores agent and target, `set_goal_from_row` makes the row's agent
position the target (as the reference's `_set_goal_state(goal_proprio)`).
"""
from __future__ import annotations

import numpy as np

from .base import Env, Policy, RandomPolicy, copy_row, far_enough, register, sample_until

CANVAS = 224
BORDERS = ((10.0, 14.0), (210.0, 214.0))  # half-open intervals, both axes
WALL_CENTER = 112.0
WALL_HALF = 5.0  # thickness 10 -> x in [107, 117]
DOOR_CENTER = 49.0
DOOR_HALF = 14.0
DOOR_TOL = 1.75
RADIUS = 7.0
SPEED = 5.0
SUCCESS_DIST = 16.0
CLAMP_LO, CLAMP_HI = 14.0 + RADIUS, 210.0 - RADIUS
SAMPLE_LO, SAMPLE_HI = 14.0, 209.0
DOOR_REACH = 10.5  # the expert's "at the door" tolerance
RED = np.array([255.0, 0.0, 0.0], np.float32)

_BG_CACHE: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _coords(size: int) -> np.ndarray:
    """Canvas coordinate sampled by each of the `size` pixels along one axis."""
    return (np.arange(size, dtype=np.float64) + 0.5) * (CANVAS / size) - 0.5


def _background(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(size, size, 3) uint8 walls and borders, and the pixel coordinates; cached per size."""
    if size not in _BG_CACHE:
        u = _coords(size)
        line = np.zeros(size, bool)
        for lo, hi in BORDERS:
            line |= (u >= lo) & (u < hi)
        wall_x = (u >= WALL_CENTER - WALL_HALF) & (u <= WALL_CENTER + WALL_HALF)
        door_y = (u >= DOOR_CENTER - DOOR_HALF) & (u <= DOOR_CENTER + DOOR_HALF)
        black = line[None, :] | line[:, None] | (wall_x[None, :] & ~door_y[:, None])  # [y, x]
        img = np.full((size, size, 3), 255, np.uint8)
        img[black] = 0
        img.setflags(write=False)
        _BG_CACHE[size] = (img, u)
    return _BG_CACHE[size]


def _blob_window(agent_xy, size: int):
    """(gx, gy, m, (x0, x1, y0, y1)): the agent's separable Gaussian along each axis at `size` px and
    the pixel window outside which it changes no rounded uint8 value (None: it changes nothing)."""
    _, u = _background(size)
    two_r2 = 2.0 * RADIUS * RADIUS
    gx = np.exp(-((u - agent_xy[0]) ** 2) / two_r2)
    gy = np.exp(-((u - agent_xy[1]) ** 2) / two_r2)
    m = gx.max() * gy.max()
    if m <= 0:
        return gx, gy, m, None
    xs = np.nonzero(gx / gx.max() > 1e-3)[0]
    ys = np.nonzero(gy / gy.max() > 1e-3)[0]
    if xs.size == 0 or ys.size == 0:
        return gx, gy, m, None
    return gx, gy, m, (xs[0], xs[-1] + 1, ys[0], ys[-1] + 1)


def draw(agent_xy, size: int) -> np.ndarray:
    """The TwoRoom frame with the agent at `agent_xy` (canvas coordinates), at `size` px."""
    bg, u = _background(size)
    img = bg.copy()
    two_r2 = 2.0 * RADIUS * RADIUS
    gx = np.exp(-((u - agent_xy[0]) ** 2) / two_r2)
    gy = np.exp(-((u - agent_xy[1]) ** 2) / two_r2)
    m = gx.max() * gy.max()
    if m <= 0:
        return img
    # the blob is separable: blend only the window where it can change a rounded uint8 value
    xs = np.nonzero(gx / gx.max() > 1e-3)[0]
    ys = np.nonzero(gy / gy.max() > 1e-3)[0]
    if xs.size == 0 or ys.size == 0:
        return img
    x0, x1, y0, y1 = xs[0], xs[-1] + 1, ys[0], ys[-1] + 1
    a = (np.outer(gy[y0:y1], gx[x0:x1]) / m).astype(np.float32)[..., None]
    patch = img[y0:y1, x0:x1].astype(np.float32)
    img[y0:y1, x0:x1] = np.rint(patch * (1.0 - a) + RED * a).astype(np.uint8)
    return img


def _resize(img: np.ndarray, out_wh, box=None) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.fromarray(img).resize(out_wh, Image.BILINEAR, box=box))


_REF_BG: dict[int, np.ndarray] = {}


def _dyadic(x: float) -> bool:
    return float(x * 2 ** 16).is_integer()


def draw_reference(agent_xy, size: int) -> np.ndarray:
    """The reference's frame: drawn on the 224 px canvas, resized with PIL's bilinear filter.

    Computed as the reference computes it, but only where the agent can change it (when the shrink
    224 / size is a dyadic fraction, so that every sample position below is exact in floating
    point): the resized empty canvas is cached per size; only the output rows whose filter support
    (PIL's bilinear support, one input pixel per output pixel of shrink on each side) reaches the
    agent's rows are resized again, from a band of canvas rows wide enough that PIL clips the support
    only where it clips it on the whole canvas, with PIL's own `box` on the output grid (the same
    sample centres and coefficients, shifted by whole rows; a box that crops columns is not exact in
    PIL, measured). Equal to resizing the whole frame (tests/test_envs.py checks it pixel for pixel);
    other sizes resize the whole frame."""
    if size == CANVAS:
        return draw(agent_xy, CANVAS)
    s = CANVAS / size
    if not _dyadic(s):
        return _resize(draw(agent_xy, CANVAS), (size, size))
    if size not in _REF_BG:
        bg = _resize(_background(CANVAS)[0].copy(), (size, size))
        bg.setflags(write=False)
        _REF_BG[size] = bg
    out = _REF_BG[size].copy()
    gx, gy, m, win = _blob_window(agent_xy, CANVAS)
    if win is None:
        return out
    x0, x1, y0, y1 = win
    sup = max(s, 1.0) + 2.0  # the filter's half-width in canvas pixels, and a margin

    def spans(a0, a1):  # output pixels reached, and the canvas crop their samples need
        j0 = max(int(np.floor((a0 - sup) / s)), 0)
        j1 = min(int(np.ceil((a1 + sup) / s)), size)
        c0 = max(int(np.floor(j0 * s - 2 * sup)), 0)  # (PIL needs more than the support: measured)
        c1 = min(int(np.ceil(j1 * s + 2 * sup)), CANVAS)
        return j0, j1, c0, c1

    i0, i1, cy0, cy1 = spans(y0, y1)  # (whole rows: PIL's box is exact for a crop of rows, not of columns)
    crop = _background(CANVAS)[0][cy0:cy1].copy()
    a = (np.outer(gy[y0:y1], gx[x0:x1]) / m).astype(np.float32)[..., None]
    patch = crop[y0 - cy0:y1 - cy0, x0:x1].astype(np.float32)
    crop[y0 - cy0:y1 - cy0, x0:x1] = np.rint(patch * (1.0 - a) + RED * a).astype(np.uint8)
    out[i0:i1] = _resize(crop, (size, i1 - i0), box=(0, i0 * s - cy0, CANVAS, i1 * s - cy0))
    return out


RENDER_MODES = {"reference": draw_reference, "direct": draw}


def in_door(y: float) -> bool:
    return DOOR_CENTER - DOOR_HALF - DOOR_TOL <= y <= DOOR_CENTER + DOOR_HALF + DOOR_TOL


def move(p: np.ndarray, action) -> np.ndarray:
    """One step of the reference dynamics from position p (canvas px) under a raw action."""
    a = np.clip(np.asarray(action, np.float64).reshape(2), -1.0, 1.0)
    q = np.clip(p + a * SPEED, CLAMP_LO, CLAMP_HI)
    left_edge = WALL_CENTER - WALL_HALF - RADIUS
    right_edge = WALL_CENTER + WALL_HALF + RADIUS
    if p[0] < WALL_CENTER:
        if q[0] > left_edge and not in_door(q[1]):
            q[0] = left_edge - 0.5
    else:
        if q[0] < right_edge and not in_door(q[1]):
            q[0] = right_edge + 0.5
    return q


def _in_wall_zone(x: float) -> bool:
    return abs(x - WALL_CENTER) <= WALL_HALF + RADIUS


def path_steps(agent, target) -> float:
    """Steps along agent -> door centre -> target (for the min_steps option)."""
    door = np.array([WALL_CENTER, DOOR_CENTER])
    if (agent[0] < WALL_CENTER) == (target[0] < WALL_CENTER):
        return float(np.linalg.norm(target - agent)) / SPEED
    return float(np.linalg.norm(door - agent) + np.linalg.norm(target - door)) / SPEED


@register("tworoom")
class TwoRoomEnv(Env):
    name = "tworoom"
    action_dim = 2
    state_columns = ("proprio", "state")
    probe_targets = {"agent": ("proprio", slice(0, 2))}
    visual_doc = "the red agent turns green from t0 on (R and G channels swapped in the frames; exact)"
    physical_doc = ("at t0 the agent jumps to a uniform random position outside the wall zone, at least "
                    "--min-distance canvas px (224 px canvas) from where it was; then the recorded actions")
    default_min_distance = 50.0
    stop_on_success = True  # the reference terminates TwoRoom episodes at the target
    default_max_steps = 100
    packages = ("numpy",)  # versions recorded in collected files
    action_doc = "a in [-1,1]^2: agent displacement / 5 px per step (canvas 224 px)"

    def __init__(self, image_size: int = 224, target_other_room: bool = False, min_steps: int = 0,
                 render: str = "reference"):
        super().__init__(image_size)
        if render not in RENDER_MODES:
            raise ValueError(f"tworoom: render must be one of {', '.join(RENDER_MODES)}, got {render!r}")
        self.render_mode = render
        self._draw = RENDER_MODES[render]
        self.target_other_room = bool(target_other_room)
        self.min_steps = int(min_steps)
        self.agent = np.array([56.0, 112.0])
        self.target = np.array([168.0, 112.0])

    # -- sampling ------------------------------------------------------------------------------
    def _sample(self, rng: np.random.Generator) -> None:
        while True:
            agent = rng.uniform(SAMPLE_LO, SAMPLE_HI, 2)
            if not _in_wall_zone(agent[0]):
                break
        for _ in range(10_000):
            target = rng.uniform(SAMPLE_LO, SAMPLE_HI, 2)
            if self.target_other_room:
                if (target[0] < WALL_CENTER) == (agent[0] < WALL_CENTER) or _in_wall_zone(target[0]):
                    continue
            if self.min_steps > 0 and path_steps(agent, target) < self.min_steps:
                continue
            break
        self.agent, self.target = agent, target

    # -- Env -----------------------------------------------------------------------------------
    def reset(self, seed: int | None = None, render: bool = True) -> dict:
        self._sample(np.random.default_rng(seed))
        return self._obs(render)

    def step(self, action, render: bool = True) -> dict:
        a = np.asarray(action, np.float64).reshape(-1)
        if a.shape != (2,) or not np.isfinite(a).all():
            raise ValueError(f"tworoom: action must be 2 finite numbers, got {action!r}")
        self.agent = move(self.agent, a)
        return self._obs(render)

    def render(self, size: int | None = None) -> np.ndarray:
        return self._draw(self.agent, int(size or self.image_size))

    def goal_pixels(self, size: int | None = None) -> np.ndarray:
        return self._draw(self.target, int(size or self.image_size))

    def row(self) -> dict:
        return {"proprio": self.agent.copy(), "state": np.concatenate([self.agent, self.target])}

    def set_state_from_row(self, row: dict) -> None:
        if "state" in row:
            s = np.asarray(row["state"], np.float64).reshape(-1)
            self.agent, self.target = s[:2].copy(), s[2:4].copy()
        if "proprio" in row:
            self.agent = np.asarray(row["proprio"], np.float64).reshape(-1)[:2].copy()

    def set_goal_from_row(self, row: dict) -> None:
        src = row["proprio"] if "proprio" in row else row["state"]
        self.target = np.asarray(src, np.float64).reshape(-1)[:2].copy()

    def distance(self) -> float:
        return float(np.linalg.norm(self.agent - self.target))

    def goal_errors(self) -> dict[str, float]:
        return {"agent_target_px": self.distance()}

    def success(self) -> bool:
        return self.distance() < SUCCESS_DIST

    def teleport(self, row, rng, min_distance):
        old = np.asarray(row["proprio"], float).reshape(-1)[:2]
        new = sample_until(rng, lambda: rng.uniform(SAMPLE_LO, SAMPLE_HI, 2),
                           lambda p: not _in_wall_zone(p[0]) and far_enough(p, old, min_distance), "agent")
        out = copy_row(row)
        out["proprio"] = out["proprio"].reshape(-1)
        out["proprio"][:2] = new
        if "state" in out:
            out["state"] = out["state"].reshape(-1)
            out["state"][:2] = new
        return out


class TwoRoomExpert(Policy):
    """Door-seeking expert (reference.md section 9): if the target is in the other room, head for
    the door centre (112, 49) until within 10.5 px of it, then head for the target; the action is
    the unit vector towards the waypoint. Noise 2.0: the reference's ExpertPolicy(action_noise=2.0)."""
    name = "expert"
    default_noise = 2.0

    def act(self) -> np.ndarray:
        agent, target = self.env.agent, self.env.target
        waypoint = target
        if (agent[0] > WALL_CENTER) != (target[0] > WALL_CENTER):
            door = np.array([WALL_CENTER, DOOR_CENTER])
            if np.linalg.norm(door - agent) > DOOR_REACH:
                waypoint = door
        d = waypoint - agent
        n = float(np.linalg.norm(d))
        return d / n if n > 1e-8 else np.zeros(2)


TwoRoomEnv.policies = {"expert": TwoRoomExpert, "random": RandomPolicy}  # the first is the default
