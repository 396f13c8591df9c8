"""MuJoCo rendering shared by the MuJoCo environments (Reacher, Cube): one offscreen renderer per
(model, size), with the expensive effects off, and recolouring geoms while rendering (lewm surprise's
visual perturbation).

Renderers are created once and never closed while the process runs: in the process-wide EGL setup,
freeing one context makes the next renderer return garbage frames (shared/spec/platform.md). They are
freed at interpreter exit, before mujoco.egl terminates EGL.
"""
from __future__ import annotations

import contextlib
import os

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np  # noqa: E402

_RENDERERS: dict = {}


def mujoco_frame(model, data, size: int, camera, fast: bool = True, share: str | None = None,
                 msaa: bool = True) -> np.ndarray:
    """(size, size, 3) uint8 frame of `data` from `camera`. fast: shadows, reflections and skybox off.
    msaa=False: no multisample anti-aliasing (edges not smoothed; on a software renderer a frame of a
    mesh-heavy scene costs about half). One renderer per (model, size, fast, msaa),
    kept for the life of the process (never closed: see the module docstring). With `share`, one
    renderer per (share, size, fast) serves every model built from the same description (their
    meshes, textures and materials must be identical; the frame comes from `data`)."""
    import mujoco
    key = (share or id(model), int(size), bool(fast), bool(msaa))
    if key not in _RENDERERS:
        vis = model.vis.global_
        vis.offwidth = max(int(vis.offwidth), int(size))
        vis.offheight = max(int(vis.offheight), int(size))
        samples = int(model.vis.quality.offsamples)
        if not msaa:  # the offscreen buffer's samples are fixed when the renderer is made
            model.vis.quality.offsamples = 0
        try:
            r = mujoco.Renderer(model, int(size), int(size))
        finally:
            model.vis.quality.offsamples = samples
        if fast:
            for flag in (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION,
                         mujoco.mjtRndFlag.mjRND_SKYBOX):
                r.scene.flags[flag] = 0
        if not _RENDERERS:
            import atexit
            atexit.register(_close_renderers)  # runs before mujoco.egl's eglTerminate (LIFO)
        _RENDERERS[key] = (r, model)  # keep the model alive with its renderer
    renderer = _RENDERERS[key][0]
    renderer.update_scene(data, camera=camera)
    return renderer.render().copy()


def _close_renderers() -> None:
    """At interpreter exit only: free the renderers while EGL is still up (no noise at exit)."""
    while _RENDERERS:
        _, (r, _model) = _RENDERERS.popitem()
        try:
            r.close()
        except Exception:
            pass


@contextlib.contextmanager
def recolour_geoms(model, geoms, rgba):
    """Within the block, the named geoms of `model` (and of the renderers' own copies of it, which a
    shared renderer keeps) have colour `rgba`; restored after. Unknown geom names are skipped."""
    models = [model] + [m for _, m in _RENDERERS.values()]
    saved = []
    try:
        for m in {id(m): m for m in models}.values():
            for g in geoms:
                try:
                    gid = m.geom(g).id
                except Exception:
                    continue
                saved.append((m, gid, m.geom_rgba[gid].copy()))
                m.geom_rgba[gid] = np.asarray(rgba, dtype=m.geom_rgba.dtype)
        yield
    finally:
        for m, gid, old in saved:
            m.geom_rgba[gid] = old
