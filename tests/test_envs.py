"""The four environments: determinism, restoring a row reproduces its frame, success rules, policies.

Cube renders at ~10 frames/s in software and its first build takes a few seconds: its tests render
only a handful of frames.
"""
import numpy as np
import pytest

from lewm.envs import env_names, make
from lewm.envs import make_policy, policy_names


def rollout(env, policy, seed, steps, render=True):
    """Reset, run `steps` policy steps; returns the list of observation dicts (rows + pixels)."""
    obs = [env.reset(seed=seed, render=render)]
    policy.reset(np.random.default_rng(seed))
    for _ in range(steps):
        obs.append(env.step(policy(), render=render))
        policy.after_step()
    return obs


def state_only(row):
    return {k: v for k, v in row.items() if k != "pixels"}


def assert_rows_equal(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# -- registry ----------------------------------------------------------------------------------------
def test_registry_lists_the_four_envs():
    assert {"tworoom", "pusht", "cube", "reacher"} <= set(env_names())
    with pytest.raises(ValueError, match="unknown environment 'nope'"):
        make("nope")


def test_unknown_policy_names_the_known_ones():
    env = make("tworoom", image_size=32)
    assert policy_names("tworoom") == ["expert", "random"]
    with pytest.raises(ValueError, match="unknown policy 'nope'.*expert, random"):
        make_policy(env, "nope")


# -- TwoRoom -----------------------------------------------------------------------------------------
def test_tworoom_geometry_at_224():
    from lewm.envs import tworoom as T
    env = make("tworoom")
    env.reset(seed=0)
    env.agent = np.array([60.0, 150.0])
    img = env.render()
    assert img.shape == (224, 224, 3) and img.dtype == np.uint8
    assert (img[12, 30] == 0).all() and (img[30, 211] == 0).all()  # border lines [10,14), [210,214)
    assert (img[9, 30] == 255).all() and (img[14, 30] == 255).all()
    assert (img[150, 107] == 0).all() and (img[150, 117] == 0).all() and (img[150, 118] == 255).all()  # wall
    assert (img[49, 112] == 255).all() and (img[35, 112] == 255).all() and (img[34, 112] == 0).all()  # door
    assert tuple(img[150, 60]) == (255, 0, 0)  # agent centre: opaque red
    assert img[150, 60 + 7, 1] == round(255 * (1 - np.exp(-0.5)))  # Gaussian alpha at one radius
    g = env.goal_pixels()
    ty, tx = np.round(env.target[::-1]).astype(int)
    assert g[ty, tx, 0] == 255 and g[ty, tx, 1] < 30
    assert T.draw(env.agent, 37).shape == (37, 37, 3)  # any size


def test_tworoom_dynamics_wall_and_door():
    from lewm.envs.tworoom import move
    p = np.array([96.0, 150.0])  # left room, below the door: the wall stops it at 107 - 7 - 0.5
    assert move(p, [1, 0])[0] == 99.5
    assert move(np.array([95.0, 150.0]), [1, 0])[0] == 100.0  # not past 107 - 7: free
    p = np.array([96.0, 64.0])  # in the door span widened by 1.75: passes
    assert move(p, [1, 0])[0] == 101.0
    assert move(np.array([96.0, 65.0]), [1, 0])[0] == 99.5
    p = np.array([130.0, 150.0])  # right room
    assert move(p, [-1, 0])[0] == 125.0 and move(np.array([126.0, 150.0]), [-1, 0])[0] == 124.5
    assert tuple(move(np.array([22.0, 22.0]), [-1, -1])) == (21.0, 21.0)  # clamped to [14+r, 210-r]
    assert tuple(move(np.array([50.0, 50.0]), [3, 0])) == (55.0, 50.0)  # actions clipped to [-1, 1]


def test_tworoom_determinism_and_restore():
    env = make("tworoom", image_size=64)
    pol = make_policy(env)  # expert with the reference's noise 2.0
    a = rollout(env, pol, 3, 30)
    b = rollout(env, pol, 3, 30)
    for x, y in zip(a, b):
        assert_rows_equal(x, y)
    assert not np.array_equal(rollout(env, pol, 4, 1)[0]["state"], a[0]["state"])
    other = make("tworoom", image_size=64)
    other.reset(seed=99)
    for obs in a:
        other.set_state_from_row(state_only(obs))
        np.testing.assert_array_equal(other.render(), obs["pixels"])


def test_tworoom_success_rule():
    env = make("tworoom", image_size=32)
    env.reset(seed=0)
    row = env.row()
    env.set_goal_from_row(row)
    assert env.success()
    env.target = env.agent + np.array([15.9, 0.0])
    assert env.success()
    env.target = env.agent + np.array([16.0, 0.0])
    assert not env.success()


def test_tworoom_expert_reaches_target():
    env = make("tworoom", image_size=64)
    pol = make_policy(env, "expert", noise=0.0)
    reached = 0
    for seed in range(100):
        env.reset(seed=seed, render=False)
        pol.reset(np.random.default_rng(seed))
        for _ in range(100):
            env.step(pol(), render=False)
            if env.success():
                reached += 1
                break
    assert reached >= 95, reached


def test_tworoom_target_other_room_option_and_speed():
    import time
    env = make("tworoom", image_size=64, target_other_room=True)
    for seed in range(20):
        env.reset(seed=seed, render=False)
        assert (env.agent[0] < 112) != (env.target[0] < 112)
    pol = make_policy(env)
    env.reset(seed=0)
    pol.reset(np.random.default_rng(0))
    t0, n = time.perf_counter(), 300
    for _ in range(n):
        env.step(pol())
    assert n / (time.perf_counter() - t0) > 300  # ~20,000 steps/s measured; loose on a shared machine


# -- PushT -------------------------------------------------------------------------------------------
def test_pusht_determinism_restore_and_relative_actions():
    env = make("pusht", image_size=64)
    pol = make_policy(env)
    a = rollout(env, pol, 1, 25)
    b = rollout(env, pol, 1, 25)
    for x, y in zip(a, b):
        assert_rows_equal(x, y)
    other = make("pusht", image_size=64)
    other.reset(seed=7)
    for obs in a:
        other.set_state_from_row(state_only(obs))
        np.testing.assert_array_equal(other.render(), obs["pixels"])
    # restoring continues the physics: same actions from a restored row give the same states
    env.reset(seed=2)
    acts = [np.array([0.8, -0.3]), np.array([0.5, 0.5]), np.array([-1.0, 0.2])]
    env.step(acts[0])
    mid = env.row()
    for u in acts[1:]:
        env.step(u)
    other.reset(seed=5)
    other.set_state_from_row(mid)
    for u in acts[1:]:
        other.step(u)
    np.testing.assert_allclose(other.row()["state"], env.row()["state"], atol=1e-6)
    # relative action: the PD target is the agent position + 50 px * a
    env.reset(seed=3)
    x0 = env.row()["state"][0]
    np.testing.assert_allclose(env.to_absolute([1.0, 0.0]), [x0 + 50, env.row()["state"][1]])
    env.step([1.0, 0.0])
    assert env.row()["state"][0] > x0 + 5


def test_pusht_success_rule():
    env = make("pusht", image_size=32)
    env.reset(seed=0)
    row = env.row()
    env.set_goal_from_row(row)
    assert env.success()
    goal = row["state"].copy()
    goal[4] = (goal[4] + np.pi / 9 - 1e-3) % (2 * np.pi)  # angle just inside pi/9, wrapped
    goal[0] += 19.0  # position error 19 < 20
    env.set_goal_from_row({"state": goal})
    assert env.success()
    goal[1] += 7.0  # sqrt(19^2 + 7^2) > 20
    env.set_goal_from_row({"state": goal})
    assert not env.success()
    goal = row["state"].copy()
    goal[4] += np.pi / 9 + 1e-3
    env.set_goal_from_row({"state": goal})
    assert not env.success()


def test_pusht_pusher_moves_the_block():
    """The scripted pusher moves the block (>10 px or >0.2 rad) in at least 16 of 20 episodes
    (measured: 20/20)."""
    env = make("pusht", image_size=32)
    pol = make_policy(env, "pusher")
    moved = 0
    for seed in range(20):
        env.reset(seed=seed, render=False)
        pol.reset(np.random.default_rng(seed))
        b0 = env.row()["state"][2:5].copy()
        for _ in range(80):
            env.step(pol(), render=False)
            b = env.row()["state"][2:5]
            dang = abs((b[2] - b0[2] + np.pi) % (2 * np.pi) - np.pi)
            if np.linalg.norm(b[:2] - b0[:2]) > 10 or dang > 0.2:
                moved += 1
                break
    assert moved >= 16, moved


def test_pusht_expert_solves_most_episodes_and_leaves_the_physics_alone():
    """The planning expert (the default PushT data policy) reaches the episode's goal (agent and
    block, PushTEnv.success) in at least 7 of 10 episodes within 300 steps at its collection noise
    (measured: 43 of 50, README), and its planning in the simulator restores the state it found."""
    env = make("pusht", image_size=32)
    pol = make_policy(env)
    assert pol.name == "expert"
    solved = 0
    for seed in range(10):
        env.reset(seed=1000 + seed, render=False)
        pol.reset(np.random.default_rng(seed))
        for t in range(300):
            before = env.row()
            a = pol()
            after = env.row()
            if t < 3:  # a decision simulates pushes, then puts every body back (to pymunk's rounding)
                for k in before:
                    np.testing.assert_allclose(before[k], after[k], rtol=0, atol=1e-9, err_msg=k)
            env.step(a, render=False)
            if env.success():
                solved += 1
                break
    assert solved >= 7, solved


# -- Reacher -----------------------------------------------------------------------------------------
def test_reacher_determinism_restore_success():
    env = make("reacher", image_size=48)
    pol = make_policy(env)  # random, as the reference's data
    a = rollout(env, pol, 5, 15)
    b = rollout(env, pol, 5, 15)
    for x, y in zip(a, b):
        assert_rows_equal(x, y)
    other = make("reacher", image_size=48)
    other.reset(seed=1)
    for obs in a[::3]:
        other.set_state_from_row(state_only(obs))
        diff = np.abs(other.render().astype(int) - obs["pixels"])
        assert diff.max() <= 2, diff.max()
    env.set_goal_from_row(env.row())
    assert env.success()
    q = env.row()["qpos"]
    env.set_goal_from_row({"qpos": q + np.array([0.09, -0.09])})
    assert env.success()
    env.set_goal_from_row({"qpos": q + np.array([2 * np.pi - 0.05, 0.0])})  # shoulder wraps
    assert env.success()
    env.set_goal_from_row({"qpos": q + np.array([0.0, 0.11])})
    assert not env.success()


def test_reacher_expert_reaches_targets():
    env = make("reacher", image_size=32)
    pol = make_policy(env, "expert", noise=0.0)
    reached = 0
    for seed in range(10):
        env.reset(seed=seed, render=False)
        pol.reset(np.random.default_rng(seed))
        for _ in range(150):
            env.step(pol(), render=False)
            if env.success():
                reached += 1
                break
    assert reached >= 8, reached


# -- decimated visual meshes (the software renderer's cost) ------------------------------------------
def _grid_mesh_model(n=20, h=0.01):
    """A MuJoCo model with one n x n grid mesh of spacing h m (2 n^2 faces) on a visual-only geom."""
    import mujoco
    ij = [(i, j) for i in range(n + 1) for j in range(n + 1)]
    vert = " ".join(f"{i * h} {j * h} {0.001 * ((i + j) % 2)}" for i, j in ij)
    faces = []
    for i in range(n):
        for j in range(n):
            a, b, c, d = i * (n + 1) + j, (i + 1) * (n + 1) + j, (i + 1) * (n + 1) + j + 1, i * (n + 1) + j + 1
            faces += [f"{a} {b} {c}", f"{a} {c} {d}"]
    xml = f"""<mujoco><asset><mesh name="grid" vertex="{vert}" face="{' '.join(faces)}"/></asset>
      <worldbody><geom type="mesh" mesh="grid" contype="0" conaffinity="0"/></worldbody></mujoco>"""
    return mujoco.MjModel.from_xml_string(xml)


def test_decimated_meshes_merge_vertices_within_a_cell_and_leave_the_model_alone():
    pytest.importorskip("mujoco")
    from lewm.envs.mujoco_render import decimated_meshes
    m = _grid_mesh_model()
    faces, verts = m.mesh_facenum.copy(), m.mesh_vert.copy()
    fine = decimated_meshes(m, 1e-4)  # no two vertices share a cell: every face kept
    assert fine.mesh_facenum[0] == faces[0] == 800
    np.testing.assert_array_equal(fine.mesh_face[:800], m.mesh_face[:800])
    coarse = decimated_meshes(m, 0.04)  # 4 x 4 grid points per cell
    assert 0 < coarse.mesh_facenum[0] < faces[0] / 4
    kept = coarse.mesh_face[:coarse.mesh_facenum[0]]
    cells = np.floor(coarse.mesh_vert[kept] / 0.04).astype(int)  # (faces, 3 corners, xyz)
    assert all(len({tuple(c) for c in f}) == 3 for f in cells), "a kept face has two corners in one cell"
    assert len({tuple(sorted(f)) for f in kept.tolist()}) == len(kept), "a face kept twice"
    # the original is untouched; the copy keeps every array's size (it renders the original's data)
    np.testing.assert_array_equal(m.mesh_facenum, faces)
    np.testing.assert_array_equal(m.mesh_vert, verts)
    np.testing.assert_array_equal(coarse.mesh_vert, verts)
    assert coarse.mesh_face.shape == m.mesh_face.shape
    with pytest.raises(ValueError, match="cell"):
        decimated_meshes(m, 0.0)


# -- Cube --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cube():
    env = make("cube", image_size=32)
    yield env
    env.close()


def test_cube_determinism_and_restore(cube):
    pol = make_policy(cube)  # OGBench's oracle + noise 0.1
    a = rollout(cube, pol, 2, 20, render=False)
    b = rollout(cube, pol, 2, 20, render=False)
    for x, y in zip(a, b):
        assert_rows_equal(x, y)
    row = a[-1]
    cube.reset(seed=2)
    cube.set_state_from_row(row)
    frame = cube.render()
    cube.reset(seed=11)
    assert not np.array_equal(cube.render(), frame)
    cube.set_state_from_row(row)
    assert_rows_equal(state_only(cube.row()), state_only(row))
    diff = np.abs(cube.render().astype(int) - frame)
    assert diff.max() <= 2, diff.max()
    # a frame rendered during a step equals the frame of its restored row
    obs = cube.step(np.zeros(5, np.float32))
    cube.reset(seed=3, render=False)
    cube.set_state_from_row(state_only(obs))
    assert np.abs(cube.render().astype(int) - obs["pixels"]).max() <= 2


def test_cube_frame_with_decimated_meshes_is_the_full_meshes_frame(cube):
    """fast_render draws the arm decimated for the frame's size: a fraction of the faces, the same frame
    up to a few edge pixels; the simulated model keeps every face."""
    from lewm.envs.cube import GYM_ID, MESH_CELL
    from lewm.envs.mujoco_render import _RENDERERS, mujoco_frame
    faces = int(cube.model.mesh_facenum.sum())
    cube.reset(seed=5, render=False)
    for a in np.random.default_rng(0).uniform(-1, 1, (5, 5)):
        cube.step(a, render=False)
    fast = cube.render()
    full = mujoco_frame(cube.model, cube.data, 32, "front_pixels", True, share=GYM_ID, msaa=False)
    d = np.abs(fast.astype(int) - full.astype(int))
    assert d.mean() < 1.0 and (d.max(-1) > 0).mean() < 0.1, (d.mean(), (d.max(-1) > 0).mean())
    assert int(cube.model.mesh_facenum.sum()) == faces
    drawn = _RENDERERS[(GYM_ID, 32, True, False, MESH_CELL / 32)][1]
    assert int(drawn.mesh_facenum.sum()) < faces / 3


def test_cube_success_rule(cube):
    cube.reset(seed=4, render=False)
    row = cube.row()
    cube.set_goal_from_row(row)
    assert cube.success()
    cube.set_goal_from_row({"cube_pos": row["cube_pos"] + [0.039, 0, 0], "cube_quat": row["cube_quat"]})
    assert cube.success()
    cube.set_goal_from_row({"cube_pos": row["cube_pos"] + [0.03, 0.03, 0], "cube_quat": row["cube_quat"]})
    assert not cube.success()


def test_cube_oracle_places_the_cube(cube):
    pol = make_policy(cube, "oracle", noise=0.0)
    cube.reset(seed=0, render=False)
    pol.reset(np.random.default_rng(0))
    for t in range(150):
        cube.step(pol(), render=False)
        if cube.success():
            break
    assert cube.success(), "the oracle did not place the cube within 150 steps"


def test_tworoom_renders_as_the_reference_at_any_size():
    """Default: the 224 px canvas resized with PIL's bilinear filter (the reference's AddPixels), so 64 px
    frames have grey antialiased walls; render="direct" draws at the size (crisp walls); equal at 224."""
    from PIL import Image

    from lewm.envs import make
    ref, direct = make("tworoom", image_size=64), make("tworoom", image_size=64, render="direct")
    for e in (ref, direct):
        e.reset(seed=3)
    big = make("tworoom", image_size=224)
    big.reset(seed=3)
    want = np.asarray(Image.fromarray(big.render()).resize((64, 64), Image.BILINEAR))
    assert np.array_equal(ref.render(), want) and np.array_equal(ref.goal_pixels(), np.asarray(
        Image.fromarray(big.goal_pixels()).resize((64, 64), Image.BILINEAR)))
    diff = np.abs(ref.render().astype(int) - direct.render()).max(-1)
    assert (diff > 16).mean() > 0.05  # the two renderings are not the same data
    assert len(np.unique(ref.render())) > len(np.unique(direct.render()))  # grey levels from the resize
    d224 = make("tworoom", image_size=224, render="direct")
    d224.reset(seed=3)
    assert np.array_equal(d224.render(), big.render())
    with pytest.raises(ValueError, match="render must be one of reference, direct"):
        make("tworoom", render="crisp")


def test_tworoom_reference_frames_equal_resizing_the_whole_canvas():
    """draw_reference re-resizes only the rows the agent can change (exact only for shrinks that are
    dyadic fractions; other sizes take the whole resize): pixel for pixel the whole canvas resized,
    at every agent position tried, the borders and off-canvas positions included."""
    from PIL import Image

    from lewm.envs import tworoom as T
    rng = np.random.default_rng(0)
    edges = np.array([-9.0, 0.0, 3.0, 7.0, 13.5, 110.0, 210.0, 217.0, 224.0, 233.0])
    for size in (32, 64, 28, 96, 112, 7):
        for k in range(60):
            xy = rng.uniform(-30, 254, 2) if k % 2 else rng.choice(edges, 2) + rng.uniform(-1.5, 1.5, 2)
            want = np.asarray(Image.fromarray(T.draw(xy, T.CANVAS)).resize((size, size), Image.BILINEAR))
            assert np.array_equal(T.draw_reference(xy, size), want), (size, xy)


def test_the_registry_alone_lists_envs_policies_probe_targets_and_perturbations():
    """An environment is one file: everything collect, probe and surprise need comes from its class,
    and the registry finds every module of lewm/envs without a hand-kept list."""
    import pkgutil

    import lewm.envs
    from lewm.envs import base, env_class, env_names
    files = {m.name for m in pkgutil.iter_modules(lewm.envs.__path__)} - base._NOT_ENVS
    assert set(env_names()) == files == {"tworoom", "pusht", "cube", "reacher"}
    table = {}
    for name in env_names():
        cls = env_class(name)
        assert cls is not None and issubclass(cls, base.Env) and cls.name == name
        assert cls.policies and all(issubclass(p, base.Policy) for p in cls.policies.values())
        from lewm.evals.probe import TRANSFORMS
        assert cls.probe_targets and all(isinstance(c, str) and isinstance(s, slice) and set(tf) <= set(TRANSFORMS)
                                         for c, s, *tf in cls.probe_targets.values())
        # every probe target's column is one the env writes
        assert {c for c, *_ in cls.probe_targets.values()} <= set(cls.state_columns), name
        assert cls.teleport is not base.Env.teleport and cls.physical_doc and cls.visual_doc
        table[name] = (list(cls.policies), sorted(cls.probe_targets))
    assert table["tworoom"] == (["expert", "random"], ["agent"])
    assert table["pusht"] == (["expert", "pusher", "random"], ["agent", "angle", "angle_sc", "block"])
    assert table["cube"][0][0] == "oracle" and table["reacher"][0][0] == "random"
    assert table["cube"][1] == ["cube", "effector", "gripper"]  # the cube and the arm the actions drive
    from lewm.evals.probe import env_probe_targets
    assert env_probe_targets("reacher") == env_class("reacher").probe_targets
