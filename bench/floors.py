"""FLOP and byte floors of one plan (shared/spec/performance.md, "Floors"), for the config measured.

FLOPs are counted, not estimated: `torch.utils.flop_counter.FlopCounterMode` runs each model piece
once for ONE candidate / ONE frame (matrix products, convolutions and attention; elementwise work is
not counted) and the plan's total is assembled from the planner's structure, which is exact:

    encode-once planners (b), (c):  2E encodes + iterations x E x S rollouts + E final rollouts
    re-encoding reference (a):      iterations x 2E encodes + iterations x E x S rollouts + E final
    DINO-WM (d):                    E goal encodes + iterations x E x S rollouts, each rollout encoding
                                    its own copy of the start frame (as DINO-WM's rollout does)

Byte floor: the weights read once per dependent model call if nothing stays in cache (predictor +
pred_proj + action encoder per rollout step, the encoder per encode call), as the spec counts it; the
activations are left out. The true floor is lower where the weights fit in cache (L2 on a GPU).

Floors in time divide by rates measured in the same run on the same device (a large fp32 GEMM, a large
copy; see benchutil.gemm_peak_gflops / copy_bandwidth_gbs) and, on a GPU, by the spec's bf16 figure.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode


def _count(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def _nbytes(mod: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in mod.parameters())


@torch.no_grad()
def lewm_units(model, fast_weights=None) -> dict:
    """FLOPs of one LeWM encode (one frame), one reference rollout (one candidate, no KV cache) and one
    fast rollout (KV cache, `lewm_kernels.rollout.rollout_reference`), plus weight bytes."""
    m = model.cfg.model
    dev = model.action_mean.device
    px = torch.randint(0, 256, (1, m.image_size, m.image_size, 3), dtype=torch.uint8, device=dev)
    H = model.cfg.plan.horizon
    z0 = torch.randn(1, 1, m.embed_dim, device=dev)
    acts = torch.randn(1, H, m.action_input_dim, device=dev)
    goal = torch.randn(1, m.embed_dim, device=dev)
    u = {"encode": _count(lambda: model.encode(px)),
         "rollout_ref": _count(lambda: model.rollout(z0, acts))}
    if fast_weights is not None:
        from lewm_kernels.rollout import rollout_reference
        u["rollout_fast"] = _count(lambda: rollout_reference(fast_weights, z0, acts, goal, check=False))
    u["bytes_encoder"] = _nbytes(model.encoder)
    u["bytes_rollout_step"] = _nbytes(model.predictor) + _nbytes(model.pred_proj) + _nbytes(model.action_encoder)
    return u


@torch.no_grad()
def dinowm_units(dmodel, horizon: int) -> dict:
    c = dmodel.cfg
    dev = dmodel.device
    img = torch.randn(1, 1, 3, c.image_size, c.image_size, device=dev)
    pro = torch.zeros(1, 1, c.proprio_dim, device=dev)
    acts = torch.randn(1, horizon, c.action_input_dim, device=dev)
    return {"encode": _count(lambda: dmodel.encode_obs(img, pro)),
            "rollout": _count(lambda: dmodel.rollout(img, pro, acts)),  # includes its encode of the start
            "bytes_encoder": _nbytes(dmodel.encoder), "bytes_predictor": _nbytes(dmodel.predictor)}


def plan_floors(kind: str, units: dict, E: int, S: int, iterations: int, horizon: int) -> dict:
    """{flops, bytes} of one plan of `kind` in {"reference_reencode", "reference", "fast", "dinowm"}."""
    if kind == "dinowm":
        flops = E * units["encode"] + iterations * E * S * units["rollout"]
        # weights per call: the encoder once per rollout (batched over S) and the predictor per step
        calls_pred = iterations * E * horizon
        calls_enc = E + iterations * E
        return {"flops": flops, "bytes": calls_enc * units["bytes_encoder"] + calls_pred * units["bytes_predictor"]}
    roll = units["rollout_fast"] if kind == "fast" else units["rollout_ref"]
    enc_calls = 2 * iterations if kind == "reference_reencode" else 2
    flops = enc_calls * E * units["encode"] + (iterations * S + 1) * E * roll
    # one batched call per rollout step (all E*S candidates together) and per encode (E frames)
    b = enc_calls * units["bytes_encoder"] + (iterations + 1) * horizon * units["bytes_rollout_step"]
    return {"flops": flops, "bytes": b}
