"""`lewm eval`: model-predictive control under the evaluation protocol (shared/spec/reference.md section 7).

    results = evaluate("runs/tworoom", "tworoom", "data/tworoom.h5", planner="cem")
    results["success_rate"], results["ci95"], results["plan_time_s"]["median"]

The protocol, as the reference runs it:

* **Episodes.** `episodes` (50) start rows drawn uniformly without replacement, with a NumPy
  generator seeded with `seed` (42), from the rows whose step index is <= ep_len - goal_offset - 1.
  By default the pool is the *held-out* episodes: `split_episodes(E, cfg.train.val_frac,
  cfg.train.seed)` with the checkpoint's own training config, so they were never trained on.
  `split="all"` (formerly "train") is the reference's protocol: every episode of the file (its eval data was the
  training data, issue #90).
* **Start and goal.** Each episode gets its own env instance: `reset(seed)`, then
  `set_state_from_row(row s)` and `set_goal_from_row(row s + goal_offset)` (goal_offset = 25 raw
  steps). The start frame is the env's render at the data set's image size; the goal frame is the
  data set's pixels at row s + goal_offset. `LeWM.encode` resizes both to the model's image size.
* **MPC.** Replan every `receding_horizon * frameskip` env steps (5 x 5 = 25: the whole plan runs
  open loop before the next plan, about 2 plans in a budget of 50). Plans are mapped to raw actions
  by the planner (`Planner.to_raw`, with the action mean/std stored in the checkpoint) and clipped
  to the env's action box. No warm start (the reference's `actions[:, receding:]` is empty here).
* **Success.** `env.success()` checked after every step; an episode counts as a success if it
  holds at ANY step within `budget` (50) steps.

Batching: all episodes of a batch (`num_envs`, default all of them, as the reference's
num_envs=50) are planned in ONE `planner.plan(starts (E, ...), goals (E, ...))` call per
replanning round. An episode that has succeeded is *masked*: it stops stepping and is left out of
later planning calls (its result cannot change; later calls get smaller).

Determinism: the random draws of each plan are explicit and per episode: the noise of episode i in
round r comes from its own generator seeded with (seed, i, r, stream). So an episode's actions do
not depend on which other episodes share its batch, on masking or on `num_envs`, and two planners
given the same seed (e.g. "cem" and "fast") see identical draws.

The random-policy baseline (`random_baseline=True`, or planner "random") runs the same protocol
with uniform raw actions in the env's action box (a fresh uniform action every step).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import write_text
from ..checkpoint import config_of, read_meta, resolve
from ..config import Config, resolve_device
from ..errors import UserError, require
from ..model import LeWM
from ..plan.planners import PLANNERS, RandomPlanner, make_planner
from .common import check_split, env_matches, norm_name

# -- statistics --------------------------------------------------------------------------------------
def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion k/n."""
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    den = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return (lo, hi)


def _percentiles(xs: list[float]) -> dict:
    if not xs:
        return {"median": None, "p10": None, "p90": None, "mean": None, "n": 0}
    a = np.asarray(xs, np.float64)
    return {"median": float(np.median(a)), "p10": float(np.percentile(a, 10)),
            "p90": float(np.percentile(a, 90)), "mean": float(a.mean()), "n": int(a.size)}


# -- the data side of the protocol -------------------------------------------------------------------
def qualifying_rows(ep_len: np.ndarray, ep_offset: np.ndarray, episodes: np.ndarray, goal_offset: int) -> np.ndarray:
    """Rows of `episodes` whose step index s satisfies s <= ep_len - goal_offset - 1 (so row
    s + goal_offset is in the same episode)."""
    parts = [int(ep_offset[e]) + np.arange(int(ep_len[e]) - goal_offset, dtype=np.int64)
             for e in episodes if int(ep_len[e]) > goal_offset]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def select_starts(pool: np.ndarray, episodes: int, seed: int) -> np.ndarray:
    """`episodes` rows drawn uniformly without replacement from `pool` (NumPy generator, `seed`)."""
    return np.random.default_rng(seed).choice(pool, size=episodes, replace=False).astype(np.int64)


def read_rows(path, rows: np.ndarray, columns: list[str]) -> dict[str, np.ndarray]:
    """The given per-row columns at `rows` (any order, repeats allowed): name -> (len(rows), ...)."""
    from ..data.format import open_h5
    rows = np.asarray(rows, np.int64)
    order, inv = np.unique(rows, return_inverse=True)
    out = {}
    with open_h5(path) as f:
        for k in columns:
            out[k] = np.asarray(f[k][order])[inv]
    return out


def _row_dicts(cols: dict[str, np.ndarray]) -> list[dict]:
    n = len(next(iter(cols.values()))) if cols else 0
    return [{k: v[i] for k, v in cols.items()} for i in range(n)]


# -- inputs, checked before any work -----------------------------------------------------------------
@dataclass
class EvalSetup:
    cfg: Config
    checkpoint: str | None
    env_name: str
    data: Path
    image_size: int  # the data set's frames (envs render at this size)
    env_kwargs: dict
    bounds: tuple[np.ndarray, np.ndarray]
    split: str
    pool_size: int
    start_rows: np.ndarray
    goal_rows: np.ndarray
    row_columns: list[str]
    data_env: str | None = None
    notes: list[str] = field(default_factory=list)
    pool: np.ndarray | None = None  # every qualifying start row (replacements are drawn from it)
    goal_offset: int = 25


def make_env(env_name: str, image_size: int, **kwargs):
    from ..envs import make
    try:
        return make(env_name, image_size=image_size, **kwargs)
    except ValueError as e:
        raise UserError(str(e)) from None
    except RuntimeError as e:  # a simulator package is missing
        raise UserError(str(e)) from None


def _render_kwargs(env_name: str, data, info, image_size: int, cols: list, notes: list) -> dict:
    """How the data's frames were rendered, so the episodes' live frames are rendered alike (the goal
    frames are the data's own): the file's `env_kwargs` attribute (TwoRoom's render=reference|direct),
    and where it records none (files written before TwoRoom had two renderings), the rendering that
    reproduces the data's first frame from its first row's state."""
    ek = info.attrs.get("env_kwargs") or {}
    if isinstance(ek, str):  # (attributes are decoded from JSON when read; a raw string is tolerated)
        try:
            ek = json.loads(ek)
        except ValueError:
            ek = {}
    ek = ek if isinstance(ek, dict) else {}
    if "render" in ek:
        return {"render": ek["render"]}
    if norm_name(env_name) != "tworoom":
        return {}
    from ..envs.tworoom import RENDER_MODES
    row = _row_dicts(read_rows(Path(data), np.array([0]), cols))[0]
    frame = np.asarray(read_rows(Path(data), np.array([0]), ["pixels"])["pixels"][0])
    for mode in RENDER_MODES:
        env = make_env(env_name, image_size, render=mode)
        try:
            env.reset(seed=0)
            env.set_state_from_row(row)
            if np.array_equal(env.render(), frame):
                if mode != "reference":
                    notes.append(f"the data's frames are TwoRoom's render={mode} (found from its first frame): "
                                 "episodes render alike")
                return {"render": mode}
        finally:
            env.close()
    notes.append("no TwoRoom rendering reproduces the data's first frame: episodes use the default rendering")
    return {}


def check_inputs(cfg: Config, env_name: str, data, *, episodes: int, goal_offset: int, budget: int,
                 split: str = "heldout", seed: int = 42, checkpoint: str | None = None) -> EvalSetup:
    """Every check the user can fail, before any planning: raises UserError (or DataError) with one
    line naming the file, column or flag. Returns the drawn start/goal rows.

    Image sizes are allowed to differ between the data set and the checkpoint: `encode` resizes
    frames to the model's size (a note is recorded)."""
    from ..data.dataset import split_episodes
    from ..data.format import inspect

    for flag, v in (("--episodes", episodes), ("--goal-offset", goal_offset), ("--budget", budget)):
        if not isinstance(v, (int, np.integer)) or v <= 0:
            raise UserError(f"{flag} must be a positive integer, got {v!r}")
    split = check_split(split)
    env = make_env(env_name, 64)  # unknown name / missing simulator package
    try:
        env.reset(seed=0)
        env.success()
    except NotImplementedError:
        raise UserError(f"environment '{env_name}' has no success rule (success() is not implemented); "
                        "it cannot be evaluated") from None
    info = inspect(data)  # DataError: missing file, wrong layout
    data_env = info.attrs.get("env")
    if not env_matches(env_name, data_env):
        raise UserError(f"--data {info.path}: collected in environment '{data_env}' (attribute 'env'), "
                        f"not '{env_name}'")
    image_size = int(info.image_shape[0])
    A = int(env.action_dim)
    m = cfg.model
    where = f"--checkpoint {checkpoint}" if checkpoint else "the model"
    if m.action_dim != A:
        raise UserError(f"{where} was trained for {m.action_dim}-D actions (model.action_dim), but environment "
                        f"'{env_name}' has {A}-D actions")
    if info.action_dim != A:
        raise UserError(f"--data {info.path}: column 'action' has {info.action_dim} dims, but environment "
                        f"'{env_name}' has {A}-D actions")
    needed = [c for c in env.state_columns if c in info.columns]
    if not needed:
        raise UserError(f"--data {info.path}: has none of the columns environment '{env_name}' needs to restore "
                        f"a row ({', '.join(env.state_columns)})")
    bounds = (np.asarray(env.action_low, np.float32), np.asarray(env.action_high, np.float32))
    env.close()

    if split == "heldout":
        _, eps = split_episodes(info.num_episodes, cfg.train.val_frac, cfg.train.seed)
        if len(eps) == 0:
            raise UserError(f"--data {info.path}: no held-out episodes ({info.num_episodes} episodes, "
                            f"train.val_frac={cfg.train.val_frac}); use --split all (the reference's protocol; formerly --split train)")
        which = f"{len(eps)} held-out episodes"
    else:
        eps = np.arange(info.num_episodes)
        which = f"{len(eps)} episodes"
    pool = qualifying_rows(info.ep_len, info.ep_offset, eps, goal_offset)
    if pool.size == 0:
        longest = int(info.ep_len[eps].max())
        raise UserError(f"--data {info.path}: too short for --goal-offset {goal_offset}: no start row qualifies "
                        f"(the longest of its {which} has {longest} rows in column 'ep_len'; a start needs "
                        f"{goal_offset} more rows in its episode)")
    if pool.size < episodes:
        raise UserError(f"--data {info.path}: only {pool.size} start rows qualify for --goal-offset {goal_offset} "
                        f"in its {which}, fewer than --episodes {episodes}")
    starts = select_starts(pool, episodes, seed)
    notes = []
    if image_size != m.image_size:
        notes.append(f"data frames are {image_size} px, the model's {m.image_size} px: encode resizes them")
    cols = [c for c in info.columns if c not in ("pixels", "ep_len", "ep_offset")
            and len(info.columns[c][0]) >= 1 and info.columns[c][0][0] == info.num_rows]
    env_kwargs = _render_kwargs(env_name, data, info, image_size, cols, notes)
    return EvalSetup(cfg=cfg, checkpoint=checkpoint, env_name=env_name, data=Path(data), image_size=image_size,
                     env_kwargs=env_kwargs, bounds=bounds, split=split, pool_size=int(pool.size), start_rows=starts,
                     goal_rows=starts + goal_offset, row_columns=cols, data_env=data_env, notes=notes, pool=pool,
                     goal_offset=goal_offset)


# -- the MPC loop ------------------------------------------------------------------------------------
def _noise_axis(planner) -> int | None:
    try:
        s1, s2 = planner.noise_shape(1), planner.noise_shape(2)
    except (AttributeError, NotImplementedError):
        return None
    return next(i for i, (a, b) in enumerate(zip(s1, s2)) if a != b)


def episode_noise(planner, episode_ids, round_idx: int, seed: int, stream: int = 0) -> torch.Tensor | None:
    """The explicit random draws of one planning round: each episode's slice comes from its own
    generator seeded with (seed, episode, round, stream), concatenated on the planner's env axis."""
    axis = _noise_axis(planner)
    if axis is None:
        return None
    shape = planner.noise_shape(1)
    uniform = getattr(planner, "noise_dist", "normal") == "uniform"
    dev = planner.device
    draws = []
    for ep in episode_ids:
        s = int(np.random.SeedSequence([int(seed), int(ep), int(round_idx), int(stream)]).generate_state(1)[0])
        g = torch.Generator(device=dev)
        g.manual_seed(s)
        draws.append((torch.rand if uniform else torch.randn)(shape, generator=g, device=dev))
    return torch.cat(draws, dim=axis)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _video_frame(agent: np.ndarray, goal: np.ndarray, done: bool, min_size: int = 128) -> np.ndarray:
    """Agent view | goal side by side, upscaled (nearest) to >= min_size, green border once solved."""
    h = agent.shape[0]
    k = max(1, -(-min_size // h))
    gap = np.full((h, max(1, h // 32), 3), 255, np.uint8)
    img = np.concatenate([agent, gap, goal], axis=1)
    img = img.repeat(k, 0).repeat(k, 1)
    if done:
        b = max(2, k)
        img[:b], img[-b:], img[:, :b], img[:, -b:] = (0, 200, 0), (0, 200, 0), (0, 200, 0), (0, 200, 0)
    return img


def run_episodes(planner, setup: EvalSetup, episode_ids, start_rows: list, goal_rows: list, goal_pixels: np.ndarray,
                 *, budget: int, steps_per_round: int, seed: int, stream: int = 0, record=(),
                 bar=None) -> dict:
    """Run one batch of episodes under MPC. `start_rows`/`goal_rows` are lists of row dicts,
    `goal_pixels` (E, H, W, 3). Returns per-episode success steps, plan times, videos."""
    E = len(episode_ids)
    envs = []
    for j in range(E):
        env = make_env(setup.env_name, setup.image_size, **setup.env_kwargs)
        env.reset(seed=int(seed) + int(episode_ids[j]))
        env.set_state_from_row(start_rows[j])
        env.set_goal_from_row(goal_rows[j])
        envs.append(env)
    low, high = setup.bounds
    success_step: list[int | None] = [None] * E
    executed: list[list] = [[] for _ in range(E)]  # the raw actions each env was stepped with
    videos = {j: [] for j in range(E) if episode_ids[j] in record}
    for j in videos:
        videos[j].append(_video_frame(envs[j].render(), goal_pixels[j], False))
    plan_times, plan_batch = [], []
    dev = planner.device
    t, rnd = 0, 0
    active = list(range(E))
    while t < budget and active:
        frames = torch.from_numpy(np.stack([envs[j].render() for j in active]))
        goals = torch.from_numpy(goal_pixels[active])
        noise = episode_noise(planner, [episode_ids[j] for j in active], rnd, seed, stream)
        _sync(dev)
        t0 = time.perf_counter()
        res = planner.plan(frames, goals, noise=noise)
        raw = res.raw_actions.detach().float().cpu().numpy()  # (Ea, H*fs, A)
        _sync(dev)
        plan_times.append(time.perf_counter() - t0)
        plan_batch.append(len(active))
        raw = np.clip(raw, low, high)
        n = min(steps_per_round, budget - t, raw.shape[1])
        for k in range(n):
            for a, j in enumerate(active):
                if success_step[j] is not None:
                    continue
                envs[j].step(raw[a, k], render=False)  # frames only where planned or recorded
                executed[j].append(raw[a, k].copy())
                if envs[j].success():
                    success_step[j] = t + k + 1
                if j in videos:
                    videos[j].append(_video_frame(envs[j].render(), goal_pixels[j], success_step[j] is not None))
            if bar is not None:
                bar.update(1)
        t += n
        rnd += 1
        active = [j for j in active if success_step[j] is None]
        if bar is not None:
            bar.set_postfix_str(f"round {rnd}, solved {sum(s is not None for s in success_step)}/{E}")
    if bar is not None and t < budget:
        bar.update(budget - t)
    # where each episode ended (at its first success, or after the budget): the latent distance the
    # planner minimises and the env's own errors against the goal
    final = torch.from_numpy(np.stack([env.render() for env in envs]))
    with torch.no_grad():
        m = planner.model
        d = (m.encode(final) - m.encode(torch.from_numpy(np.ascontiguousarray(goal_pixels)))).pow(2).sum(-1)
    errors = [{k: float(v) for k, v in env.goal_errors().items()} for env in envs]
    for env in envs:
        env.close()
    return {"success_step": success_step, "plan_times": plan_times, "plan_batch": plan_batch,
            "rounds": rnd, "videos": {int(episode_ids[j]): v for j, v in videos.items()},
            "actions": [np.asarray(a, dtype=np.float32).reshape(-1, low.shape[-1]) for a in executed],
            "final_latent_distance": d.float().cpu().tolist(), "final_errors": errors}


def _protocol(planner, setup: EvalSetup, *, budget: int, steps_per_round: int, seed: int, num_envs: int | None,
              stream: int, record, progress: bool, desc: str) -> dict:
    n = len(setup.start_rows)
    cols = [c for c in setup.row_columns]
    s_cols = read_rows(setup.data, setup.start_rows, cols)
    g_cols = read_rows(setup.data, setup.goal_rows, cols)
    goal_px = read_rows(setup.data, setup.goal_rows, ["pixels"])["pixels"]
    starts, goals = _row_dicts(s_cols), _row_dicts(g_cols)
    bs = n if not num_envs else max(1, int(num_envs))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=budget * -(-n // bs), desc=desc, unit="step", dynamic_ncols=True, leave=False)
    success_step, plan_times, plan_batch, videos, rounds, actions = [], [], [], {}, 0, []
    latent_d, errors = [], []
    try:
        for lo in range(0, n, bs):
            ids = list(range(lo, min(n, lo + bs)))
            r = run_episodes(planner, setup, ids, starts[lo:lo + bs], goals[lo:lo + bs], goal_px[lo:lo + bs],
                             budget=budget, steps_per_round=steps_per_round, seed=seed, stream=stream,
                             record=record, bar=bar)
            success_step += r["success_step"]
            plan_times += r["plan_times"]
            plan_batch += r["plan_batch"]
            videos.update(r["videos"])
            actions += r["actions"]
            rounds += r["rounds"]
            latent_d += r["final_latent_distance"]
            errors += r["final_errors"]
    finally:
        if bar is not None:
            bar.close()
    succ = [s is not None for s in success_step]
    k = int(sum(succ))
    lo_ci, hi_ci = wilson_interval(k, n)
    steps = [s for s in success_step if s is not None]
    per_env = [t / b for t, b in zip(plan_times, plan_batch)]
    records = [{"episode": i, "start_row": int(setup.start_rows[i]), "goal_row": int(setup.goal_rows[i]),
                "success": succ[i], "first_success_step": success_step[i],
                "final_latent_distance": latent_d[i], "final_state_errors": errors[i]} for i in range(n)]
    return {"success_rate": k / n, "ci95": [lo_ci, hi_ci], "successes": succ, "num_successes": k,
            "steps_to_success": success_step,
            "steps_to_success_median": float(np.median(steps)) if steps else None,
            "plan_time_s": _percentiles(plan_times), "plan_time_per_env_s": _percentiles(per_env),
            "plan_calls": len(plan_times), "envs_per_call": _percentiles([float(b) for b in plan_batch]),
            "records": records, "_videos": videos, "_actions": actions}


def _head(given, cls, load, ckpt, device, missing: str):
    """(a planner head, where it was read from or None): `given` itself when it is a `cls`, else loaded with
    `load` from the path given or, without one, from the checkpoint's folder."""
    if isinstance(given, cls):
        return given, None
    if given is None and ckpt is None:
        raise UserError(missing)
    src = str(given or ckpt)
    return load(src, device), src


def _resolve_model(model, device: str) -> tuple[Config, Any, str | None, dict]:
    """(config, loader, checkpoint path, checkpoint metadata): the weights are only loaded after the checks."""
    if isinstance(model, torch.nn.Module):
        meta = {"source": model.reference_source} if getattr(model, "reference_source", None) else {}
        return model.cfg, (lambda: model), None, meta
    ckpt = resolve(model)
    meta = read_meta(ckpt, "--checkpoint")
    cfg = config_of(meta, ckpt)
    return cfg, (lambda: LeWM.load(ckpt, map_location=device)), str(ckpt), meta


# -- what the episodes are: already solved, drawn from the checkpoint's own data ----------------------
def solved_at_start(setup: EvalSetup, start_rows: np.ndarray, goal_rows: np.ndarray, chunk: int = 256) -> np.ndarray:
    """(len(start_rows),) bool: the env's success rule already holds with the start row's state and the
    goal row's goal, before any action."""
    env = make_env(setup.env_name, setup.image_size, **setup.env_kwargs)
    out = np.zeros(len(start_rows), bool)
    try:
        for lo in range(0, len(start_rows), chunk):
            s = _row_dicts(read_rows(setup.data, start_rows[lo:lo + chunk], setup.row_columns))
            g = _row_dicts(read_rows(setup.data, goal_rows[lo:lo + chunk], setup.row_columns))
            for i, (a, b) in enumerate(zip(s, g)):
                env.reset(seed=0)
                env.set_state_from_row(a)
                env.set_goal_from_row(b)
                out[lo + i] = bool(env.success())
    finally:
        env.close()
    return out


def replace_solved(setup: EvalSetup, solved: np.ndarray, seed: int) -> int:
    """Replace (in place, keeping each episode's index) every already-solved start row of `setup` by a row
    drawn uniformly without replacement from the rest of the pool (generator seeded with (seed, 1)) that
    is not solved either. Returns the number of rows drawn as replacements."""
    need = [i for i in range(len(solved)) if solved[i]]
    if not need:
        return 0
    used = set(int(r) for r in setup.start_rows)
    rest = np.array([r for r in setup.pool if int(r) not in used], np.int64)
    order = np.random.default_rng([int(seed), 1]).permutation(rest)
    drawn = 0
    for lo in range(0, len(order), 256):
        cand = order[lo:lo + 256]
        ok = ~solved_at_start(setup, cand, cand + setup.goal_offset)
        for r in cand[ok]:
            if not need:
                break
            i = need.pop(0)
            setup.start_rows[i], setup.goal_rows[i] = r, r + setup.goal_offset
        drawn += len(cand)
        if not need:
            return drawn
    raise UserError(f"--data {setup.data}: only {len(setup.start_rows) - len(need)} start rows of its pool "
                    f"({setup.pool_size}) are not already solved at the start, fewer than --episodes "
                    f"{len(setup.start_rows)}; use fewer episodes or --include-solved")


def check_training_data(net: LeWM, meta: dict, setup: EvalSetup, allow_other_data: bool) -> str:
    """Is --data the file the checkpoint was trained on? Compared by content: the action mean/std the
    training stored in the checkpoint against the file's action column (and the path it recorded). With
    --split heldout a mismatch is an error (its "held-out" episodes may be another file's training
    episodes, or the split may not exist) unless allow_other_data; otherwise a warning. Returns the
    finding, recorded in the results."""
    from ..data.dataset import action_stats
    from ..data.format import open_h5
    src = meta.get("source") or {}
    where = f"--checkpoint {setup.checkpoint}" if setup.checkpoint else "the model"
    if src.get("format") == "reference" and setup.split == "heldout" and not allow_other_data:
        raise UserError(f"{where} was converted from the reference, which trained on clips of every episode of its "
                        "data (no episode held out): use --split all (the reference's protocol; formerly --split train)")
    with open_h5(setup.data) as f:
        mean, std = action_stats(np.asarray(f["action"][()], np.float32))
    m, s = net.action_mean.detach().cpu().numpy(), net.action_std.detach().cpu().numpy()
    trained_on = meta.get("data")
    if np.all(m == 0) and np.all(s == 1):
        return "unknown: the checkpoint stores no action statistics, so its training data cannot be told"
    if np.allclose(m, mean, rtol=1e-4, atol=1e-5) and np.allclose(s, std, rtol=1e-4, atol=1e-5):
        return "matches: the checkpoint's action statistics are the data file's"
    msg = (f"--data {setup.data} is not the file {where} was trained on"
           f"{f' ({trained_on})' if trained_on else ''}: its action statistics differ (mean "
           f"{np.round(mean, 4).tolist()} vs {np.round(m, 4).tolist()})")
    if setup.split == "heldout" and not allow_other_data:
        raise UserError(msg + "; its 'held-out' episodes would not be held out from anything: give the training "
                        "file, or --allow-other-data")
    return "differs: " + msg


def _summary(r: dict) -> dict:
    return {k: r[k] for k in ("success_rate", "ci95", "successes", "num_successes", "steps_to_success",
                              "steps_to_success_median", "records")}


def evaluate(model, env: str, data, *, planner: str = "cem", planner_kw: dict | None = None,
             episodes: int | None = None, goal_offset: int | None = None, budget: int | None = None,
             receding_horizon: int | None = None, split: str = "heldout", seed: int | None = None,
             device: str | None = "auto", num_envs: int | None = None, random_baseline: bool = True,
             exclude_solved: bool = True, seeds: int = 1, allow_other_data: bool = False,
             videos: int = 0, progress: bool = False, log=None) -> dict:
    """Run the evaluation protocol (module docstring; docs/evaluation.md). `model` is a LeWM or a
    checkpoint path (a checkpoint folder or a training run folder). Defaults (episodes, goal_offset,
    budget, receding_horizon, seed) come from the model's PlanConfig.

    exclude_solved: start/goal pairs already solved before any action are replaced by unsolved ones
    (their count is reported either way). seeds: the protocol is repeated with planner seeds seed,
    seed+1, ... on the same episodes. random_baseline: the random policy on the same episodes, per seed.
    Returns the results dict; results["_videos"] holds {episode: [frames]} for the first `videos`
    episodes of the first seed (removed by `save_results`)."""
    device = resolve_device(device)
    cfg, load, ckpt, meta = _resolve_model(model, device)
    p = cfg.plan
    episodes = p.episodes if episodes is None else episodes
    goal_offset = p.goal_offset if goal_offset is None else goal_offset
    budget = p.budget if budget is None else budget
    receding = p.receding_horizon if receding_horizon is None else receding_horizon
    seed = p.seed if seed is None else seed
    if planner not in PLANNERS:
        raise UserError(f"unknown planner '{planner}' (known: {', '.join(PLANNERS)})")
    if not isinstance(receding, int) or receding <= 0:
        raise UserError(f"--receding-horizon must be a positive integer, got {receding!r}")
    if not isinstance(seeds, int) or seeds <= 0:
        raise UserError(f"--seeds must be a positive integer, got {seeds!r}")
    horizon = (planner_kw or {}).get("horizon") or p.horizon
    if receding > horizon:
        raise UserError(f"--receding-horizon {receding} exceeds the planning horizon ({horizon} macro steps)")
    setup = check_inputs(cfg, env, data, episodes=episodes, goal_offset=goal_offset, budget=budget,
                         split=split, seed=seed, checkpoint=ckpt)
    net = load()
    net = net.to(device).eval()
    data_check = check_training_data(net, meta, setup, allow_other_data)
    if data_check.startswith("differs"):
        setup.notes.append("warning: " + data_check[len("differs: "):])
    drawn_rows = setup.start_rows.copy()
    solved = solved_at_start(setup, setup.start_rows, setup.goal_rows)
    replacements = replace_solved(setup, solved, seed) if exclude_solved else 0
    if log:
        for note in setup.notes:
            log(f"note: {note}")
    kw = dict(planner_kw or {})
    idm_src = reach_src = None
    if planner == "idm" or kw.get("init") == "idm":  # the inverse-dynamics head (lewm/plan/idm.py)
        from ..plan.idm import IDMHead, load_idm
        kw["idm"], idm_src = _head(kw.get("idm"), IDMHead, load_idm, ckpt, device,
                                   "planner 'idm' / --init idm needs the IDM head: give --idm PATH")
    if kw.get("cost") in ("reach", "mix"):  # the reachability head (lewm/plan/reach.py)
        from ..plan.reach import ReachHead, load_reach
        kw["reach"], reach_src = _head(kw.get("reach"), ReachHead, load_reach, ckpt, device,
                                       f"--cost {kw['cost']} needs the reachability head: give --reach PATH")
    steps_per_round = receding * net.mcfg.frameskip
    record = set(range(min(int(videos), episodes)))
    planner_seeds = [int(seed) + k for k in range(seeds)]
    runs, randoms, pl = [], [], None
    t0 = time.perf_counter()
    for k, s in enumerate(planner_seeds):
        pl = make_planner(planner, net, **dict(kw, seed=s))
        if planner == "random":
            pl.low, pl.high = torch.from_numpy(setup.bounds[0]), torch.from_numpy(setup.bounds[1])
        runs.append(_protocol(pl, setup, budget=budget, steps_per_round=steps_per_round, seed=s, num_envs=num_envs,
                              stream=0, record=record if k == 0 else (), progress=progress,
                              desc=f"eval {env} {planner}" + (f" seed {s}" if seeds > 1 else "")))
        if random_baseline and planner != "random":
            rp = RandomPlanner.from_config(net, low=setup.bounds[0], high=setup.bounds[1], seed=s)
            rb = _protocol(rp, setup, budget=budget, steps_per_round=steps_per_round, seed=s, num_envs=num_envs,
                           stream=1, record=(), progress=progress, desc=f"eval {env} random")
            rb.pop("_videos")
            randoms.append(rb)
    wall = time.perf_counter() - t0
    main = runs[0]
    results = {"env": env, "planner": planner, "episodes": episodes, **main, "wall_time_s": wall,
               "start_rows": setup.start_rows.tolist(), "goal_rows": setup.goal_rows.tolist()}
    results["already_solved"] = {
        "count": int(solved.sum()), "of": int(len(solved)), "excluded": bool(exclude_solved),
        "rows": drawn_rows[solved].tolist(), "rows_checked_for_replacements": int(replacements),
        "rule": "the env's success rule holds for the start row's state and the goal row's goal, before any action"}
    if randoms:
        results["random_baseline"] = _summary(randoms[0])
    n = len(setup.start_rows)

    def pooled(rs):
        rates = [r["success_rate"] for r in rs]
        k_all = sum(r["num_successes"] for r in rs)
        return {"mean": float(np.mean(rates)), "std": float(np.std(rates, ddof=1)) if len(rates) > 1 else 0.0,
                "pooled_successes": int(k_all), "pooled_trials": n * len(rs),
                "pooled_ci95": list(wilson_interval(k_all, n * len(rs)))}
    results["seeds"] = {
        "planner_seeds": planner_seeds,
        "per_seed": [{"seed": s, **_summary(r), **({"random_success_rate": rb["success_rate"],
                                                      "random_records": rb["records"]} if randoms else {})}
                     for s, r, rb in zip(planner_seeds, runs, randoms or [None] * len(runs))],
        **pooled(runs),
        **({"random": pooled(randoms)} if randoms else {}),
        "note": "the same episodes for every seed; only the planner's (and the random policy's) draws change"}
    pk = {k: getattr(pl, k) for k in ("samples", "elites", "iterations", "horizon", "var_scale", "seed",
                                      "temperature", "lr", "weight_decay") if hasattr(pl, k)}
    pk["seed"] = planner_seeds[0]
    if kw.get("init") or planner == "idm":
        pk.update(init=kw.get("init", "zeros"), idm=idm_src or "given")
    if kw.get("cost") not in (None, "l2"):
        pk.update(cost=kw["cost"], reach=reach_src or "given",
                  **({"reach_weight": kw.get("reach_weight", 1.0)} if kw["cost"] == "mix" else {}))
    results["config"] = {
        "checkpoint": ckpt, "data": str(setup.data), "data_env": setup.data_env, "split": split,
        "pool_rows": setup.pool_size, "episodes": episodes, "goal_offset": goal_offset, "budget": budget,
        "receding_horizon": receding, "frameskip": net.mcfg.frameskip, "steps_per_plan": steps_per_round,
        "seed": seed, "seeds": seeds, "exclude_solved": bool(exclude_solved), "device": device,
        "num_envs": num_envs or episodes, "planner": planner, "planner_kw": pk,
        "data_image_size": setup.image_size, "model_image_size": net.mcfg.image_size,
        "action_low": setup.bounds[0].tolist(), "action_high": setup.bounds[1].tolist(),
        "torch": torch.__version__, "notes": setup.notes, "training_data": data_check,
        "trained_on": meta.get("data"), "checkpoint_source": (meta.get("source") or {}).get("format", "lewm"),
        "success_masking": "episodes stop and leave the planning batch once solved",
        "random_streams": "one generator per (seed, episode, round, stream): results do not depend on num_envs",
    }
    return results


def save_results(results: dict, out, video_format: str = "gif", fps: int = 10) -> dict:
    """Write out/results.json (atomic) and out/videos/episode_XXX.{gif,mp4}; returns the JSON part.

    A failed write (a full disk) leaves the previous results.json as it was, removes the partial file
    and raises UserError naming the file."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    videos = results.get("_videos", {})
    clean = {k: v for k, v in results.items() if not k.startswith("_")}  # _videos, _actions: not JSON
    paths = []
    if videos:
        from ..plots import write_video
        if video_format == "mp4":
            require("imageio_ffmpeg", "video", "--video-format mp4 (or use gif)")
        vd = out / "videos"
        vd.mkdir(exist_ok=True)
        for ep, frames in sorted(videos.items()):
            f = vd / f"episode_{ep:03d}.{video_format}"
            frames = list(frames) + [frames[-1]] * max(1, fps // 2)  # hold the last frame half a second
            try:
                write_video(frames, f, fps=fps, what="--video-format mp4")
            except OSError as e:
                raise UserError(f"could not write video {f}: {e.strerror or e}; results.json was not "
                                "changed") from None
            paths.append(str(f))
    clean["videos"] = paths
    try:
        write_text(json.dumps(clean, indent=2), out / "results.json")
    except OSError as e:
        prev = "the previous one is intact" if (out / "results.json").exists() else "none was written"
        raise UserError(f"could not write {out / 'results.json'}: {e.strerror or e}"
                        f"{' (the disk is full)' if e.errno == 28 else ''}; {prev}") from None
    return clean


# -- the command ------------------------------------------------------------------------------------
# `lewm eval ENV --checkpoint C --data F`: plan with a checkpoint under the evaluation protocol.
# 
#     lewm eval tworoom --checkpoint runs/tworoom --data data/tworoom.h5
#     lewm eval tworoom --checkpoint runs/tworoom --data data/tworoom.h5 --planner mppi \\
#         --random-baseline --out evals/tworoom --videos 4
# 
# The protocol (above, and docs/evaluation.md): 50 start rows drawn with seed 42 from the
# held-out episodes (--split all: every episode, as the reference), goal = the frame 25 raw steps
# later, budget 50 steps, replanning every 25 steps, success if the env's success rule holds at any
# step. Start/goal pairs already solved before any action are counted and, by default, replaced
# (--include-solved keeps them, as the reference). The random policy runs on the same episodes every
# time. --seeds N repeats the protocol with N planner seeds. Prints the success rate with its 95%
# Wilson interval beside the random policy's, and the planning time per plan; --out writes
# results.json (with a record per episode) and GIFs (agent view | goal) of the first --videos episodes.
# 
# Every input mistake is reported in one line before any planning starts: a missing checkpoint, a
# checkpoint trained for another action dimension, a data set from another environment (its `env`
# attribute) or too short for the goal offset, an environment without a success rule. Differing
# image sizes are fine (the model's encode resizes frames).
def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="plan with a checkpoint under the evaluation protocol",
                       description="Plan with a checkpoint under the evaluation protocol; print the success rate "
                                   "(95% Wilson interval) and the planning time per plan.",
                       epilog="Defaults for the planner and the protocol come from the checkpoint's plan config "
                              "(reference: CEM 300 samples, 30 elites, 30 iterations (10 outside PushT); "
                              "50 episodes, goal offset 25, budget 50).")
    p.add_argument("env", help="environment name (tworoom, pusht, cube, reacher)")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint folder (model.safetensors + config.json) or a training run folder (its latest)")
    p.add_argument("--data", required=True, help="HDF5 episodes of ENV: start and goal rows are drawn from it")
    p.add_argument("--planner", default="cem", choices=PLANNERS)
    p.add_argument("--episodes", type=int, help="episodes (50)")
    p.add_argument("--goal-offset", type=int, help="raw steps from start row to goal row (25)")
    p.add_argument("--budget", type=int, help="env steps per episode (50)")
    p.add_argument("--samples", type=int, help="planner samples (CEM/MPPI: plan config; gradient: 100)")
    p.add_argument("--iterations", type=int, help="planner iterations (gradient: Adam steps, 30)")
    p.add_argument("--elites", type=int, help="CEM/MPPI elites")
    p.add_argument("--temperature", type=float, help="MPPI temperature (0.5)")
    p.add_argument("--lr", type=float, help="gradient planner learning rate (0.1)")
    p.add_argument("--init", default="zeros", choices=["zeros", "idm"],
                   help="CEM's first mean (cem, fast): 0 (the reference) or the IDM head's proposal (lewm idm)")
    p.add_argument("--cost", default="l2", choices=["l2", "reach", "mix"],
                   help="terminal cost: l2 (the reference: squared latent distance), reach (the reachability "
                        "head, lewm reach), mix (l2 / D + --reach-weight x reach)")
    p.add_argument("--reach", help="the reachability head (a folder with reach.safetensors; default: the checkpoint's)")
    p.add_argument("--reach-weight", type=float, default=1.0, help="the reach term's weight in --cost mix (1.0)")
    p.add_argument("--idm", help="the IDM head (a folder with idm.safetensors; default: the checkpoint's folder)")
    p.add_argument("--receding-horizon", type=int, help="macro steps executed per plan (5: the whole plan)")
    p.add_argument("--split", default="heldout", choices=["heldout", "all", "train"],
                   help="heldout: episodes held out of training (default); all: every episode (the reference; "
                        "'train' is its old name)")
    p.add_argument("--seed", type=int, help="start-row draw and planner noise (42)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--num-envs", type=int, help="episodes planned per batched call (default: all)")
    p.add_argument("--random-baseline", action="store_true",
                   help="(always on: the random policy runs on the same episodes; kept for old scripts)")
    p.add_argument("--exclude-solved", action=argparse.BooleanOptionalAction, default=True,
                   help="replace start/goal pairs already solved before any action by unsolved ones (default); "
                        "--include-solved / --no-exclude-solved keeps them, as the reference")
    p.add_argument("--include-solved", dest="exclude_solved", action="store_false", help=argparse.SUPPRESS)
    p.add_argument("--seeds", type=int, default=1,
                   help="repeat the protocol with N planner seeds (seed, seed+1, ...) on the same episodes: "
                        "per-seed rates, mean +- std, a pooled 95%% interval")
    p.add_argument("--allow-other-data", action="store_true",
                   help="plan on held-out episodes of a file other than the checkpoint's training data "
                        "(refused by default: its held-out split means nothing there)")
    p.add_argument("--out", help="folder for results.json and videos")
    p.add_argument("--videos", type=int, default=0, help="write GIF/MP4s of the first N episodes (needs --out)")
    p.add_argument("--video-format", default="gif", choices=["gif", "mp4"])
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=main)


def _fmt_ci(r: dict) -> str:
    lo, hi = r["ci95"]
    return f"{100 * r['success_rate']:.1f}% (95% CI {100 * lo:.1f}-{100 * hi:.1f}%, {r['num_successes']}/{len(r['successes'])})"


def main(args) -> int:

    for flag in ("episodes", "goal_offset", "budget", "samples", "iterations", "elites", "receding_horizon",
                 "num_envs", "seeds"):
        v = getattr(args, flag)
        if v is not None and v <= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be positive, got {v}")
    for flag in ("temperature", "lr"):
        v = getattr(args, flag)
        if v is not None and not v > 0:
            raise UserError(f"--{flag} must be positive, got {v}")
    if args.videos < 0:
        raise UserError(f"--videos must be >= 0, got {args.videos}")
    if args.videos and not args.out:
        raise UserError("--videos needs --out (the folder the videos go to)")
    kw = {"samples": args.samples, "iterations": args.iterations}
    if args.planner in ("cem", "fast", "mppi"):
        kw["elites"] = args.elites
    if args.planner == "mppi":
        kw["temperature"] = args.temperature
    if args.planner == "gradient":
        kw["lr"] = args.lr
    if args.planner == "random":
        kw = {}
    if args.planner == "idm":
        kw = {"idm": args.idm}
    elif args.init == "idm":
        kw.update(init="idm", idm=args.idm)
    if args.cost != "l2":
        if args.planner == "random":
            raise UserError(f"--cost {args.cost} applies to the planners that score candidates, not 'random'")
        kw.update(cost=args.cost, reach=args.reach, reach_weight=args.reach_weight)
    res = evaluate(args.checkpoint, args.env, args.data, planner=args.planner, planner_kw=kw,
                   episodes=args.episodes, goal_offset=args.goal_offset, budget=args.budget,
                   receding_horizon=args.receding_horizon, split=args.split, seed=args.seed, device=args.device,
                   num_envs=args.num_envs, random_baseline=True, exclude_solved=args.exclude_solved,
                   seeds=args.seeds, allow_other_data=args.allow_other_data, videos=args.videos,
                   progress=not args.no_progress, log=print)
    c = res["config"]
    print(f"lewm eval {args.env}: {args.planner}, {c['episodes']} episodes ({c['split']} split, seed {c['seed']}), "
          f"goal offset {c['goal_offset']}, budget {c['budget']}, on {c['device']}")
    a = res["already_solved"]
    print(f"already solved at the start: {a['count']} of {a['of']} drawn pairs"
          + (" (replaced by unsolved pairs)" if a["excluded"] else " (kept, as the reference; --exclude-solved "
                                                                    "replaces them)"))
    print(f"success {_fmt_ci(res)}")
    if "random_baseline" in res:
        print(f"random policy {_fmt_ci(res['random_baseline'])}")
    sd = res["seeds"]
    if len(sd["planner_seeds"]) > 1:
        lo, hi = sd["pooled_ci95"]
        rates = ", ".join(f"{100 * r['success_rate']:.0f}" for r in sd["per_seed"])
        print(f"{len(sd['planner_seeds'])} seeds: {rates} %; mean {100 * sd['mean']:.1f} +- {100 * sd['std']:.1f}, "
              f"pooled {sd['pooled_successes']}/{sd['pooled_trials']} (95% CI {100 * lo:.1f}-{100 * hi:.1f}%)")
        if "random" in sd:
            r = sd["random"]
            print(f"random policy over the seeds: mean {100 * r['mean']:.1f} +- {100 * r['std']:.1f} "
                  f"(95% CI {100 * r['pooled_ci95'][0]:.1f}-{100 * r['pooled_ci95'][1]:.1f}%)")
    pt, pe = res["plan_time_s"], res["plan_time_per_env_s"]
    if pt["n"]:
        print(f"planning time per plan: median {pt['median']:.3f} s (p10 {pt['p10']:.3f}, p90 {pt['p90']:.3f}) "
              f"for {res['envs_per_call']['median']:.0f} envs per call; {1e3 * pe['median']:.1f} ms per env "
              f"({pt['n']} calls)")
    if args.out:
        saved = save_results(res, args.out, video_format=args.video_format)
        print(f"results: {args.out}/results.json" + (f", {len(saved['videos'])} videos" if saved["videos"] else ""))
    return 0
