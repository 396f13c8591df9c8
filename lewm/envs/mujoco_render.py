"""MuJoCo rendering shared by the MuJoCo environments (Reacher, Cube): one offscreen renderer per
(model, size), with the expensive effects off, optionally of a copy of the model whose visual meshes
are decimated (`decimated_meshes`: what a software renderer spends a mesh-heavy frame on), and
recolouring geoms while rendering (lewm surprise's visual perturbation).

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


def decimated_meshes(model, cell: float):
    """A copy of `model` for rendering only, each mesh's faces simplified by vertex clustering: vertices
    in the same cube of side `cell` (m, in the mesh's frame) become one (the first of them), faces that
    collapse or repeat are dropped, and each kept face keeps its original normals. The vertex arrays and
    every other field are untouched (same sizes), so the copy renders any `data` of `model`; physics never
    sees it (collisions use the original's convex hulls). A face is kept iff its corners fall in three
    different cells (once, when several faces collapse onto the same three)."""
    import copy
    if not cell > 0:
        raise ValueError(f"decimated_meshes: cell must be > 0 m, got {cell!r}")
    m = copy.deepcopy(model)
    for i in range(m.nmesh):
        va, vn = int(m.mesh_vertadr[i]), int(m.mesh_vertnum[i])
        fa, fn = int(m.mesh_faceadr[i]), int(m.mesh_facenum[i])
        if fn == 0:
            continue
        key = np.floor(m.mesh_vert[va:va + vn] / cell).astype(np.int64)
        _, first, cluster = np.unique(key, axis=0, return_index=True, return_inverse=True)
        faces = first[cluster.reshape(-1)][m.mesh_face[fa:fa + fn].astype(np.int64)]
        whole = (faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])
        _, once = np.unique(np.sort(faces[whole], axis=1), axis=0, return_index=True)
        keep = np.flatnonzero(whole)[np.sort(once)]
        normals = m.mesh_facenormal[fa:fa + fn][keep].copy()
        m.mesh_face[fa:fa + len(keep)] = faces[keep]
        m.mesh_facenormal[fa:fa + len(keep)] = normals
        m.mesh_facenum[i] = len(keep)
    return m


def mujoco_frame(model, data, size: int, camera, fast: bool = True, share: str | None = None,
                 msaa: bool = True, mesh_cell: float = 0.0) -> np.ndarray:
    """(size, size, 3) uint8 frame of `data` from `camera`. fast: shadows, reflections and skybox off.
    msaa=False: no multisample anti-aliasing (edges not smoothed; on a software renderer a frame of a
    mesh-heavy scene costs about half). One renderer per (model, size, fast, msaa),
    kept for the life of the process (never closed: see the module docstring). With `share`, one
    renderer per (share, size, fast) serves every model built from the same description (their
    meshes, textures and materials must be identical; the frame comes from `data`). mesh_cell > 0:
    the renderer draws `decimated_meshes(model, mesh_cell)` (made once, with the renderer)."""
    import mujoco
    key = (share or id(model), int(size), bool(fast), bool(msaa), float(mesh_cell))
    if key not in _RENDERERS:
        if mesh_cell > 0:
            model = decimated_meshes(model, mesh_cell)
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
