"""Reacher: dm_control's two-link planar reacher with a target joint configuration (qpos match).

The model is dm_control's suite `reacher.xml` (`dm_control.suite.reacher`), stepped with MuJoCo
directly as dm_control's Physics.step does (mj_step2 then mj_step1: one 20 ms step per action, no
action repeat, positions up to date for the frame).
The target sphere is hidden: the goal is a joint configuration, shown to a planner as a goal image.

Action: a in [-1,1]^2 (clipped): the motor commands of the shoulder and the wrist (gear 0.05).

Row columns (float64):
    qpos         (2)  shoulder, wrist angle (rad); the shoulder is unlimited, the wrist in +-160 deg
    qvel         (2)  joint velocities
    target_qpos  (2)  the episode's target configuration
`set_state_from_row` restores qpos, qvel (and target_qpos when present); `set_goal_from_row` makes
the row's `qpos` the target (the reference's `set_target_qpos(goal_qpos)`).

Success (reference task `qpos_match`): every joint within 0.1 rad of the target; the shoulder's
difference is wrapped to [-pi, pi).

reset(seed) samples the start and the target configuration as dm_control randomises joints
(shoulder uniform in [-pi, pi), wrist uniform in its range), with zero velocity.

Pixels: the suite's top-down camera "fixed", rendered with `mujoco.Renderer` at the requested size,
with shadows, reflections and the skybox off (several times faster on a software renderer).
Renderers are created once per (model, size) and never closed: in this process-wide EGL setup,
freeing one context makes the next renderer return garbage frames (shared/spec/platform.md).
"""
from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np  # noqa: E402

from .base import Env, Policy, RandomPolicy, copy_row, register, sample_until  # noqa: E402
from .mujoco_render import mujoco_frame, recolour_geoms  # noqa: E402

JOINT_TOL = 0.1
WRIST_LIMIT = np.deg2rad(160.0)

_MODEL = None


def _model():
    """The reacher MjModel, built once per process and shared by every ReacherEnv (each has its
    own MjData), so renderers are shared too."""
    global _MODEL
    if _MODEL is None:
        import mujoco
        from dm_control.suite import common
        m = mujoco.MjModel.from_xml_string(common.read_model("reacher.xml"), common.ASSETS)
        m.geom_rgba[m.geom("target").id, 3] = 0.0  # hide the target sphere
        _MODEL = m
    return _MODEL


def _wrap(x):
    return (np.asarray(x) + np.pi) % (2 * np.pi) - np.pi


@register("reacher")
class ReacherEnv(Env):
    name = "reacher"
    action_dim = 2
    state_columns = ("qpos", "qvel", "target_qpos")
    probe_targets = {"joints": ("qpos", slice(0, 2)), "joints_sc": ("qpos", slice(0, 2), "sincos")}
    visual_doc = "the arm (arm, hand and finger geoms) is rendered green from t0 on"
    physical_doc = ("at t0 both joints jump to a random configuration (shoulder uniform, wrist in its range), "
                    "at least --min-distance rad away in the larger joint change, at rest; then the recorded actions")
    default_min_distance = 0.5
    RECOLOUR_GEOMS, RECOLOUR_RGBA = ("arm", "hand", "finger"), (0.1, 0.85, 0.2, 1.0)
    stop_on_success = False
    default_max_steps = 200
    packages = ("mujoco", "dm_control")  # versions recorded in collected files
    action_doc = "a in [-1,1]^2: shoulder and wrist motor commands"

    def __init__(self, image_size: int = 224, fast_render: bool = True):
        super().__init__(image_size)
        import mujoco
        self._mj = mujoco
        self.model = _model()
        self.data = mujoco.MjData(self.model)
        self.fast_render = fast_render
        self.target_qpos = np.zeros(2)
        mujoco.mj_forward(self.model, self.data)

    @staticmethod
    def sample_qpos(rng: np.random.Generator) -> np.ndarray:
        return np.array([rng.uniform(-np.pi, np.pi), rng.uniform(-WRIST_LIMIT, WRIST_LIMIT)])

    def reset(self, seed: int | None = None, render: bool = True) -> dict:
        rng = np.random.default_rng(seed)
        self._mj.mj_resetData(self.model, self.data)
        self.data.qpos[:] = self.sample_qpos(rng)
        self.target_qpos = self.sample_qpos(rng)
        self._mj.mj_forward(self.model, self.data)
        return self._obs(render)

    def step(self, action, render: bool = True) -> dict:
        a = np.asarray(action, np.float64).reshape(-1)
        if a.shape != (2,) or not np.isfinite(a).all():
            raise ValueError(f"reacher: action must be 2 finite numbers, got {action!r}")
        self.data.ctrl[:] = np.clip(a, -1.0, 1.0)
        # dm_control's step order: integrate (step2), then recompute positions (step1), so the
        # frame shows the new qpos (a plain mj_step leaves the kinematics one step behind)
        self._mj.mj_step2(self.model, self.data)
        self._mj.mj_step1(self.model, self.data)
        return self._obs(render)

    def render(self, size: int | None = None) -> np.ndarray:
        return mujoco_frame(self.model, self.data, int(size or self.image_size), "fixed", self.fast_render)

    def goal_pixels(self, size: int | None = None) -> np.ndarray:
        saved = (self.data.qpos.copy(), self.data.qvel.copy())
        self.data.qpos[:] = self.target_qpos
        self._mj.mj_forward(self.model, self.data)
        try:
            return self.render(size)
        finally:
            self.data.qpos[:], self.data.qvel[:] = saved
            self._mj.mj_forward(self.model, self.data)

    def row(self) -> dict:
        return {"qpos": self.data.qpos.copy(), "qvel": self.data.qvel.copy(),
                "target_qpos": self.target_qpos.copy()}

    def set_state_from_row(self, row: dict) -> None:
        self.data.qpos[:] = np.asarray(row["qpos"], np.float64).reshape(-1)[:2]
        self.data.qvel[:] = np.asarray(row["qvel"], np.float64).reshape(-1)[:2] if "qvel" in row else 0.0
        if "target_qpos" in row:
            self.target_qpos = np.asarray(row["target_qpos"], np.float64).reshape(-1)[:2].copy()
        self._mj.mj_forward(self.model, self.data)

    def set_goal_from_row(self, row: dict) -> None:
        self.target_qpos = np.asarray(row["qpos"], np.float64).reshape(-1)[:2].copy()

    def joint_errors(self) -> np.ndarray:
        """|qpos - target| per joint (rad), wrapped to [-pi, pi) (matters for the free shoulder only:
        the wrist's +-160 deg range cannot bring a wrapped difference under the tolerance)."""
        return np.abs(_wrap(self.data.qpos - self.target_qpos))

    def goal_errors(self) -> dict[str, float]:
        return {"max_joint_rad": float(self.joint_errors().max())}

    def success(self) -> bool:
        return bool((self.joint_errors() < JOINT_TOL).all())


    def teleport(self, row, rng, min_distance):
        old = np.asarray(row["qpos"], float).reshape(-1)[:2]
        q = sample_until(rng, lambda: self.sample_qpos(rng),
                         lambda p: float(np.abs(_wrap(p - old)).max()) >= min_distance, "arm")
        out = copy_row(row)
        out["qpos"] = q
        out["qvel"] = np.zeros(2)
        return out

    def recolour(self):
        return recolour_geoms(self.model, self.RECOLOUR_GEOMS, self.RECOLOUR_RGBA)


class ReacherExpert(Policy):
    """A PD controller to the target configuration: a = clip(kp * wrapped error - kd * qvel),
    plus Gaussian noise (default 0.3)."""
    name = "expert"
    default_noise = 0.3
    KP, KD = 4.0, 0.2

    def act(self) -> np.ndarray:
        env: ReacherEnv = self.env
        err = env.target_qpos - env.data.qpos
        err[0] = _wrap(err[0])  # the shoulder turns freely; the wrist must go the long way round
        return np.clip(self.KP * err - self.KD * env.data.qvel, -1.0, 1.0)


ReacherEnv.policies = {"random": RandomPolicy, "expert": ReacherExpert}  # the first (the reference's data) is the default
