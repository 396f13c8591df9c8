"""`lewm collect ENV --episodes N --out FILE.h5`: run a policy in an environment, write HDF5 episodes.

    lewm collect tworoom --episodes 1000 --out tworoom.h5 --image-size 64 --workers 2

Episode i is seeded `seed + i` (the env's reset and the policy's noise), so a file is the same
whatever the number of workers. Each worker is a separate process with its own env (spawned, so no
MuJoCo/EGL state is inherited). An episode runs `--max-steps` policy steps (default per env: TwoRoom
100, PushT 150, Cube 200, Reacher 200); TwoRoom episodes end early at the target, as the
reference's.

The file follows `lewm.data.format` (flat rows, row t = (observation t, action t), NaN action on
each episode's last row) with the columns

    pixels    (N, S, S, 3) uint8    the frame of observation t
    action    (N, A)       float32  the raw action taken after it (clipped to the env's box)
    step_idx  (N,)         int32    t within the episode
    ep_idx    (N,)         int32    the episode's index (its seed is seed + ep_idx)
    ...                    float64  the env's state columns (`env.state_columns`; docs/environments.md)

A goal for evaluation is a later row of the same episode (`env.set_goal_from_row`): no separate
goal columns are needed. File attributes: env, env_kwargs, policy, noise, seed, image_size,
max_steps, episodes, action_dim, action_low/high, action_doc, state_columns, stop_on_success,
lewm_version, versions (of the packages used), created (UTC, ISO 8601).

In Python: `collect(...)` writes a file; `episodes(...)` yields the same episodes in memory.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Iterator

import numpy as np

from ..config import parse_key_value
from ..errors import UserError, WorkerError
from .format import H5Writer, episode_actions_with_nan_tail


# -- building envs and policies --------------------------------------------------------------------
def build_env(spec, image_size: int = 224, env_kwargs: dict | None = None):
    """An Env from a registered name ('tworoom', ...), a 'package.module:Factory' string (your own
    `lewm.envs.base.Env` subclass), or an Env instance (returned as is)."""
    from ..envs.base import Env, make
    if isinstance(spec, Env):
        return spec
    kwargs = dict(env_kwargs or {})
    if isinstance(spec, str) and ":" in spec:
        mod, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise UserError(f"environment '{spec}': cannot import it ({e})") from None
        return factory(image_size=image_size, **kwargs)
    try:
        return make(spec, image_size=image_size, **kwargs)
    except TypeError as e:
        raise UserError(f"environment '{spec}': bad --env-arg ({e})") from None


def _episode_rng(ep_seed: int) -> np.random.Generator:
    return np.random.default_rng([int(ep_seed), 0x1E3D])  # a stream apart from the env's reset seed


def run_episode(env, policy, ep_seed: int, max_steps: int, ep_idx: int = 0, render: bool = True) -> dict:
    """One episode as a dict of per-row columns (see the module docstring)."""
    kw = {} if render else {"render": False}
    obs = env.reset(seed=int(ep_seed), **kw)
    policy.reset(_episode_rng(ep_seed))
    rows, actions = [obs], []
    stop = bool(getattr(env, "stop_on_success", False))
    for _ in range(int(max_steps)):
        a = np.asarray(policy(), np.float32)
        obs = env.step(a, **kw)
        policy.after_step()
        actions.append(a)
        rows.append(obs)
        if stop and env.success():  # checked after a step, as the reference's termination
            break
    T = len(rows)
    ep = {k: np.stack([np.asarray(r[k]) for r in rows]) for k in rows[0]}
    acts = np.asarray(actions, np.float32).reshape(len(actions), env.action_dim)
    ep["action"] = episode_actions_with_nan_tail(acts)
    ep["step_idx"] = np.arange(T, dtype=np.int32)
    ep["ep_idx"] = np.full(T, int(ep_idx), np.int32)
    return ep


def _resolve(env_spec: str, image_size: int, env_kwargs, policy, noise):
    from ..envs.base import make_policy
    env = build_env(env_spec, image_size, env_kwargs)
    try:
        pol = make_policy(env, policy, noise)
    except ValueError as e:
        raise UserError(f"--policy/--noise: {e}") from None
    return env, pol


def _default_max_steps(env) -> int:
    return int(getattr(env, "default_max_steps", 200))


def episodes(env="tworoom", episodes: int = 1, seed: int = 0, image_size: int = 224, policy: str | None = None,
             noise: float | None = None, max_steps: int | None = None, start: int = 0,
             env_kwargs: dict | None = None, render: bool = True) -> Iterator[dict]:
    """Yield episodes `start .. start+episodes-1` in memory, each a dict of per-row columns exactly as
    `collect` writes them (`render=False` leaves out `pixels`, for fast state-only rollouts).
    `env` is a name, a 'module:Factory' string or an Env instance (reused; not closed)."""
    own = not hasattr(env, "reset")
    e, pol = _resolve(env, image_size, env_kwargs, policy, noise)
    steps = _default_max_steps(e) if max_steps is None else int(max_steps)
    try:
        for i in range(int(start), int(start) + int(episodes)):
            yield run_episode(e, pol, seed + i, steps, ep_idx=i, render=render)
    finally:
        if own:
            e.close()


# -- workers -----------------------------------------------------------------------------------------
_WORKER: dict = {}


def _worker_episode(job: tuple) -> dict:
    """In a worker process: build (once) the env and policy of `job`, run one episode."""
    env_spec, image_size, env_kwargs, policy, noise, max_steps, seed, i = job
    key = (env_spec, image_size, json.dumps(env_kwargs, sort_keys=True), policy, noise)
    if _WORKER.get("key") != key:
        _WORKER["env"], _WORKER["policy"] = _resolve(env_spec, image_size, env_kwargs, policy, noise)
        _WORKER["key"] = key
    return run_episode(_WORKER["env"], _WORKER["policy"], seed + i, max_steps, ep_idx=i)


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _parallel(jobs: list, workers: int) -> Iterator[dict]:
    """Run jobs in `workers` spawned processes; yield results in job order (bounded in flight)."""
    ctx = mp.get_context("spawn")
    ex = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
    pending: dict = {}
    nxt = 0
    try:
        for i in range(len(jobs)):
            while nxt < len(jobs) and nxt < i + 2 * workers:
                pending[nxt] = ex.submit(_worker_episode, jobs[nxt])
                nxt += 1
            fut = pending.pop(i)
            job = jobs[i]
            try:
                yield fut.result()
            except BrokenProcessPool:
                done = f"episodes 0..{i - 1} were done" if i else "no episode was done"
                raise WorkerError(f"a collection worker died abruptly while episodes {i}..{nxt - 1} were "
                                  "running (killed, out of memory, or a crash inside the simulator); "
                                  f"{done}") from None
            except UserError:
                raise
            except Exception as e:
                raise WorkerError(f"collection worker failed on episode {job[-1]} (seed {job[-2] + job[-1]}): "
                                  f"{_describe(e)}") from e
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


# -- collect -----------------------------------------------------------------------------------------
def _versions(env) -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for pkg in ("numpy", "h5py", "hdf5plugin", *getattr(env, "packages", ())):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _lewm_version() -> str:
    try:
        from importlib.metadata import version
        return version("lewm")
    except Exception:
        return "unknown"


def _check_int(flag: str, v, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise UserError(f"{flag} must be {what}, got {v!r}")
    return int(v)


def _check_env_name(env) -> None:
    from ..envs.base import Env, env_names
    if isinstance(env, Env) or (isinstance(env, str) and ":" in env):
        return
    names = env_names()
    if not isinstance(env, str) or env not in names:
        raise UserError(f"unknown environment '{env}' (known: {', '.join(names)})")


def collect(env, episodes: int, out, image_size: int = 224, seed: int = 0, workers: int = 1,
            overwrite: bool = False, policy: str | None = None, noise: float | None = None,
            max_steps: int | None = None, progress: bool = True, env_kwargs: dict | None = None) -> Path:
    """Collect `episodes` episodes of `env` (a registered name, 'module:Factory' or an Env instance)
    with `policy` (default per env, each env class's `policies`) into the HDF5 file `out`; returns its path.
    Raises UserError (one line naming the flag or file) before any work on bad input, and
    WorkerError if an episode fails; nothing is left under `out` (nor a temporary file) on failure."""
    _check_env_name(env)
    episodes = _check_int("--episodes", episodes, 1)
    image_size = _check_int("--image-size", image_size, 8)
    seed = _check_int("--seed", seed, 0)
    workers = _check_int("--workers", workers, 1)
    if max_steps is not None:
        max_steps = _check_int("--max-steps", max_steps, 1)
    if noise is not None and (not np.isfinite(float(noise)) or float(noise) < 0):
        raise UserError(f"--noise must be a non-negative number, got {noise!r}")
    out = Path(out)
    if not out.parent.exists():
        raise UserError(f"--out {out}: directory '{out.parent}' does not exist")
    if out.is_dir():
        raise UserError(f"--out {out}: is a directory, expected a file name")
    if out.exists() and not overwrite:
        raise UserError(f"--out {out}: file exists (pass --overwrite to replace it)")

    from ..envs.base import Env
    given = isinstance(env, Env)
    if given and workers > 1:
        raise UserError("--workers > 1 needs an environment name (each worker builds its own env), "
                        "not an Env instance")
    # build one env here too: it validates the env arguments and policy, and gives the metadata
    env_obj, pol = _resolve(env, image_size, env_kwargs, policy, noise)
    try:
        steps = _default_max_steps(env_obj) if max_steps is None else max_steps
        env_name = env if isinstance(env, str) else env_obj.name
        attrs = {
            "env": env_name, "env_kwargs": json.dumps(env_kwargs or {}), "policy": pol.name,
            "noise": float(pol.noise), "seed": seed, "image_size": image_size, "max_steps": steps,
            "episodes": episodes, "action_dim": int(env_obj.action_dim),
            "action_low": [float(x) for x in env_obj.action_low],
            "action_high": [float(x) for x in env_obj.action_high],
            "action_doc": getattr(env_obj, "action_doc", ""),
            "state_columns": list(env_obj.state_columns),
            "stop_on_success": bool(getattr(env_obj, "stop_on_success", False)),
            "lewm_version": _lewm_version(), "versions": _versions(env_obj),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        if workers == 1:
            def produce():
                for i in range(episodes):
                    try:
                        yield run_episode(env_obj, pol, seed + i, steps, ep_idx=i)
                    except Exception as e:
                        raise WorkerError(f"episode {i} (seed {seed + i}) failed: {_describe(e)}") from e
            stream = produce()
        else:
            env_obj.close()
            env_obj = None
            jobs = [(env, image_size, env_kwargs or {}, policy, noise, steps, seed, i) for i in range(episodes)]
            stream = _parallel(jobs, min(workers, episodes))
        from tqdm.auto import tqdm
        t0, rows = time.perf_counter(), 0
        try:
            with H5Writer(out, attrs=attrs, overwrite=overwrite) as w, \
                    tqdm(total=episodes, unit="ep", desc=f"collect {env_name}", disable=not progress) as bar:
                for ep in stream:
                    w.add_episode(ep)
                    rows += len(ep["action"])
                    bar.update(1)
                    bar.set_postfix_str(f"{rows / max(time.perf_counter() - t0, 1e-9):.0f} steps/s, {rows} rows")
        finally:
            stream.close()  # stops the workers at once if writing failed
    finally:
        if env_obj is not None and not given:
            env_obj.close()
    return out


# -- CLI ---------------------------------------------------------------------------------------------
def _parse_env_arg(s: str):
    return parse_key_value(s, "--env-arg")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("collect", help="collect episodes from an environment into HDF5",
                       description="Run a data-collection policy in an environment and write the episodes to "
                                   "an HDF5 file (layout: lewm.data.format; columns: docs/environments.md).")
    p.add_argument("env", help="environment: tworoom, pusht, cube, reacher (or package.module:Factory)")
    p.add_argument("--episodes", type=int, required=True, help="number of episodes")
    p.add_argument("--out", required=True, help="output HDF5 file")
    p.add_argument("--image-size", type=int, default=224, help="frame size in pixels (224)")
    p.add_argument("--seed", type=int, default=0, help="episode i is seeded seed + i (0)")
    p.add_argument("--workers", type=int, default=1, help="parallel processes, each with its own env (1)")
    p.add_argument("--max-steps", type=int, help="policy steps per episode (default: per env)")
    p.add_argument("--policy", help="collection policy (default per env: tworoom expert, pusht expert, "
                                    "cube oracle, reacher random; others: random)")
    p.add_argument("--noise", type=float, help="std of the Gaussian action noise (default: per policy)")
    p.add_argument("--env-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="environment option, e.g. target_other_room=true for tworoom (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
    return p


def _run(args) -> int:
    env_kwargs = dict(_parse_env_arg(s) for s in args.env_arg)
    path = collect(args.env, args.episodes, args.out, image_size=args.image_size, seed=args.seed,
                   workers=args.workers, overwrite=args.overwrite, policy=args.policy, noise=args.noise,
                   max_steps=args.max_steps, progress=not args.no_progress, env_kwargs=env_kwargs or None)
    from .format import inspect
    info = inspect(path)
    print(f"wrote {path}: {info.num_episodes} episodes, {info.num_rows} rows, "
          f"{info.image_shape[0]} px, columns {', '.join(sorted(info.columns))}")
    return 0
