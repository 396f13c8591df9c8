"""Cube: OGBench `visual-cube-single-v0` (UR5e arm + Robotiq gripper, one cube, pick and place).

Built from the gymnasium registration of "visual-cube-single-v0" (after `import ogbench`; no data
set is downloaded), with mode="data_collection". In data-collection mode every reset randomises the arm, the
cube and a target pose; the target is not drawn (the visual env's `visualize_info=False`).

OGBench envs are never closed: closing one (any MuJoCo renderer) and making another in the same
process renders garbage frames (shared/spec/platform.md). `CubeEnv.close()` returns its OGBench env
to a process-wide pool instead, and the next CubeEnv takes it from there (building one costs ~3 s).
OGBench's own renderer is never used: all cube models of the process share our renderers (one per
image size), which are never freed. Several CubeEnvs can live in one process at once.

Action: a in [-1,1]^5 (clipped), OGBench's normalised relative end-effector control: (dx, dy, dz)
times 0.05 m, dyaw times 0.3 rad, gripper opening delta times 1; one action = 25 physics steps of
2 ms (50 ms).

Row columns (float64):
    qpos         (21) MuJoCo qpos: 6 arm joints, 8 gripper joints, the cube's free joint (xyz, wxyz)
    qvel         (20) MuJoCo qvel
    proprio      (5)  effector x, y, z, effector yaw, gripper opening in [0, 1]
    cube_pos     (3)  the cube's position (m) (reference column: privileged/block_0_pos)
    cube_quat    (4)  the cube's orientation, wxyz
    target_pos   (3)  the current target position of the cube
    target_quat  (4)  the target orientation, wxyz
`set_state_from_row` restores qpos, qvel and the target; `set_goal_from_row` makes the row's cube
pose the target (the reference's `set_target_pos(0, goal_privileged_block_0_pos)`).

Success (OGBench `_compute_successes`, reference `terminate_at_goal`): ||cube - target|| <= 0.04 m.

Pixels: camera "front_pixels" (OGBench's visual camera) rendered by our own `mujoco.Renderer` at the
requested size with shadows, reflections, skybox and multisample anti-aliasing off, and the arm's and
gripper's visual meshes decimated for the frame's size (several times faster in software: the 185k mesh
faces, not the pixels, bound a frame, so a smaller image alone barely helps; frames are darker than
OGBench's own renders and their edges are not smoothed). `fast_render=False` draws the full meshes.
The frame is rendered after the step's kinematics are brought up to date (OGBench's own step renders
the positions one physics substep behind).

Speed: software rendering dominates collection on a CPU (rates: docs/environments.md); collect on a
GPU machine with EGL for real data sets.
"""
from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")

import warnings  # noqa: E402

import numpy as np  # noqa: E402

from .base import Env, Policy, RandomPolicy, copy_row, far_enough, register, sample_until  # noqa: E402
from .mujoco_render import mujoco_frame, recolour_geoms  # noqa: E402

GYM_ID = "visual-cube-single-v0"
SUCCESS_DIST = 0.04
# fast_render: the visual meshes are drawn decimated, vertices merged within cubes of MESH_CELL / size m
# (3.9 mm at 64 px, 1.1 mm at 224 px; lewm.envs.mujoco_render.decimated_meshes)
MESH_CELL = 0.25

_POOL: list = []  # idle OGBench envs of this process (never closed, see the module docstring)


def _build_ogbench_env():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import gymnasium
        import ogbench  # noqa: F401  (registers the OGBench envs)
        # the registered class and arguments, without gymnasium.make: its wrappers query the
        # observation space, which makes OGBench build a renderer of its own (never wanted here)
        spec = gymnasium.spec(GYM_ID)
        cls = gymnasium.envs.registration.load_env_creator(spec.entry_point)
        env = cls(**{**spec.kwargs, "mode": "data_collection"})
        env._mjcf_model = env.build_mjcf_model()  # with the colours of the pixel-based tasks
        # then observe states: OGBench would render (and own a renderer) at every step and reset;
        # we render ourselves
        env._ob_type = "states"
        env.reset(seed=0)
    return env


@register("cube")
class CubeEnv(Env):
    name = "cube"
    action_dim = 5
    state_columns = ("qpos", "qvel", "proprio", "cube_pos", "cube_quat", "target_pos", "target_quat")
    # the cube, and the arm the actions drive: the effector's position and the gripper's opening
    probe_targets = {"cube": ("cube_pos", slice(0, 3)), "effector": ("proprio", slice(0, 3)),
                     "gripper": ("proprio", slice(4, 5))}
    visual_doc = "the cube (pink-red) is rendered blue from t0 on (its geom colour, restored after rendering)"
    physical_doc = ("at t0 the cube jumps to a random (x, y) of OGBench's cube sampling area on the table, at "
                    "least --min-distance m from where it was, upright and at rest; then the recorded actions")
    default_min_distance = 0.1
    RECOLOUR_GEOMS, RECOLOUR_RGBA = ("object_0",), (0.2, 0.4, 0.95, 1.0)
    SAMPLING_BOUNDS = np.array([[0.3, -0.3], [0.55, 0.3]])  # OGBench's _object_sampling_bounds (x, y), m
    REST_Z = 0.02
    stop_on_success = False
    default_max_steps = 200
    packages = ("gymnasium", "ogbench", "mujoco", "dm_control")  # versions recorded in collected files
    action_doc = ("a in [-1,1]^5: OGBench normalised relative effector control "
                  "(xyz * 0.05 m, yaw * 0.3 rad, gripper opening)")

    def __init__(self, image_size: int = 224, fast_render: bool = True):
        super().__init__(image_size)
        import mujoco
        self._mj = mujoco
        self.og = _POOL.pop() if _POOL else _build_ogbench_env()
        self.fast_render = fast_render
        self._mocap = self.og._cube_target_mocap_ids[0]
        self._cube_joint = "object_joint_0"

    # -- helpers -------------------------------------------------------------------------------
    @property
    def model(self):
        return self.og._model

    @property
    def data(self):
        return self.og._data

    def cube_pos(self) -> np.ndarray:
        return self.data.joint(self._cube_joint).qpos[:3].copy()

    def target_pos(self) -> np.ndarray:
        return self.data.mocap_pos[self._mocap].copy()

    def _sync(self) -> None:
        self._mj.mj_kinematics(self.model, self.data)

    # -- Env -----------------------------------------------------------------------------------
    def reset(self, seed: int | None = None, render: bool = True) -> dict:
        if seed is None:
            seed = int(np.random.default_rng().integers(2**31))
        self.og.reset(seed=int(seed))
        return self._obs(render)

    def step(self, action, render: bool = True) -> dict:
        a = np.asarray(action, np.float64).reshape(-1)
        if a.shape != (5,) or not np.isfinite(a).all():
            raise ValueError(f"cube: action must be 5 finite numbers, got {action!r}")
        self.og.step(np.clip(a, -1.0, 1.0))
        self._sync()
        return self._obs(render)

    def render(self, size: int | None = None) -> np.ndarray:
        size = int(size or self.image_size)
        return mujoco_frame(self.model, self.data, size, "front_pixels", self.fast_render, share=GYM_ID,
                            msaa=not self.fast_render, mesh_cell=MESH_CELL / size if self.fast_render else 0.0)

    def close(self) -> None:
        """Hand the OGBench env back to the process's pool (it is never closed)."""
        if getattr(self, "og", None) is not None:
            _POOL.append(self.og)
            self.og = None

    def row(self) -> dict:
        d = self.data
        info = self.og.compute_ob_info()
        q = d.joint(self._cube_joint).qpos
        return {
            "qpos": d.qpos.copy(), "qvel": d.qvel.copy(),
            "proprio": np.concatenate([info["proprio/effector_pos"], info["proprio/effector_yaw"],
                                       info["proprio/gripper_opening"]]).astype(np.float64),
            "cube_pos": q[:3].copy(), "cube_quat": q[3:7].copy(),
            "target_pos": d.mocap_pos[self._mocap].copy(), "target_quat": d.mocap_quat[self._mocap].copy(),
        }

    def set_state_from_row(self, row: dict) -> None:
        qpos = np.asarray(row["qpos"], np.float64).reshape(-1)
        qvel = np.asarray(row["qvel"], np.float64).reshape(-1) if "qvel" in row else np.zeros(self.model.nv)
        if qpos.shape != (self.model.nq,) or qvel.shape != (self.model.nv,):
            raise ValueError(f"cube: row has qpos {qpos.shape} / qvel {qvel.shape}, the model needs "
                             f"({self.model.nq},) / ({self.model.nv},)")
        if "target_pos" in row:
            self.data.mocap_pos[self._mocap] = np.asarray(row["target_pos"], np.float64).reshape(-1)[:3]
        if "target_quat" in row:
            self.data.mocap_quat[self._mocap] = np.asarray(row["target_quat"], np.float64).reshape(-1)[:4]
        self.og.set_state(qpos, qvel)  # sets and runs mj_forward

    def set_goal_from_row(self, row: dict) -> None:
        if "cube_pos" in row:
            pos = np.asarray(row["cube_pos"], np.float64).reshape(-1)[:3]
            quat = np.asarray(row.get("cube_quat", [1.0, 0, 0, 0]), np.float64).reshape(-1)[:4]
        else:  # the cube's free joint is the last 7 entries of qpos
            q = np.asarray(row["qpos"], np.float64).reshape(-1)
            pos, quat = q[-7:-4], q[-4:]
        self.data.mocap_pos[self._mocap] = pos
        self.data.mocap_quat[self._mocap] = quat
        self._mj.mj_kinematics(self.model, self.data)

    def goal_errors(self) -> dict[str, float]:
        return {"cube_target_m": float(np.linalg.norm(self.cube_pos() - self.target_pos()))}

    def success(self) -> bool:
        return float(np.linalg.norm(self.cube_pos() - self.target_pos())) <= SUCCESS_DIST


    def teleport(self, row, rng, min_distance):
        j = self.model.joint("object_joint_0")
        qa, va = int(np.asarray(j.qposadr).reshape(-1)[0]), int(np.asarray(j.dofadr).reshape(-1)[0])
        bounds = getattr(self.og, "_object_sampling_bounds", self.SAMPLING_BOUNDS)
        qpos = np.asarray(row["qpos"], float).reshape(-1).copy()
        qvel = np.asarray(row["qvel"], float).reshape(-1).copy() if "qvel" in row else np.zeros(self.model.nv)
        old = qpos[qa:qa + 2]
        xy = sample_until(rng, lambda: rng.uniform(bounds[0], bounds[1]),
                          lambda p: far_enough(p, old, min_distance), "cube")
        qpos[qa:qa + 3] = [xy[0], xy[1], self.REST_Z]
        qpos[qa + 3:qa + 7] = [1.0, 0.0, 0.0, 0.0]
        qvel[va:va + 6] = 0.0
        out = copy_row(row)
        out.update(qpos=qpos, qvel=qvel, cube_pos=qpos[qa:qa + 3].copy(), cube_quat=qpos[qa + 3:qa + 7].copy())
        return out

    def recolour(self):
        return recolour_geoms(self.model, self.RECOLOUR_GEOMS, self.RECOLOUR_RGBA)


class CubeOracle(Policy):
    """OGBench's Markov oracle for cube pick-and-place (ogbench.manipspace.oracles.markov.
    cube_markov.CubeMarkovOracle, the reference's expert) plus Gaussian noise (default 0.1). When
    the oracle has placed the cube (or after 200 steps) the env draws a new target, as OGBench's own
    data collection does. The oracle's random final arm pose comes from the episode's generator
    (OGBench draws it from numpy's global one)."""
    name = "oracle"
    default_noise = 0.1

    def __init__(self, env, noise=None):
        super().__init__(env, noise)
        from ogbench.manipspace.oracles.markov.cube_markov import CubeMarkovOracle
        self.oracle = CubeMarkovOracle(env=env.og, min_norm=0.4)

    def _reset_oracle(self):
        og = self.env.og
        state = np.random.get_state()
        try:
            self.oracle.reset(None, og.compute_ob_info())
        finally:
            np.random.set_state(state)
        self.oracle._final_pos = self.rng.uniform(*og._arm_sampling_bounds)
        self.oracle._final_yaw = self.rng.uniform(-np.pi, np.pi)

    def reset(self, rng):
        super().reset(rng)
        self._reset_oracle()

    def act(self) -> np.ndarray:
        return self.oracle.select_action(None, self.env.og.compute_ob_info())

    def after_step(self) -> None:
        if self.oracle.done:
            self.env.og.set_new_target(return_info=False)
            self._reset_oracle()


CubeEnv.policies = {"oracle": CubeOracle, "random": RandomPolicy}  # the first is the default
