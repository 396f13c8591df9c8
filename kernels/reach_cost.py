"""Fused reachability terminal cost: the planner's `cost="reach" | "mix"` (lewm/plan/reach.py) of every
candidate's final latent in ONE kernel, straight from the rollout's last predicted latents.

What is computed, for final latents p (N, D) and goals g (E, D) (candidate n belongs to goal n // (N / E)),
with the head `ReachHead` (LayerNorm(3D) -> [Linear -> GELU] x depth -> Linear(1)) of depth 1 or 2:

    x      = [p, g, g - p]                                  (N, 3D)
    r      = sigmoid(head(x))                               (N,)
    l2     = sum_d (p - g)^2
    cost   = r                        (mode "reach")
           = l2 / D + weight * r      (mode "mix")

Each program takes BLOCK_M candidates and walks D in chunks of BLOCK_K: twice for the LayerNorm
statistics over 3D (mean, then centred squares; the pieces of x are rebuilt from p and g, never
concatenated in memory), then once for the first layer, each chunk of each piece normalised and
multiplied into the (BLOCK_M, HID) accumulator against the matching rows of W1^T. For depth 2 the
second layer runs in blocks of BLOCK_O output columns, each block's GELU output folded at once into the
final Linear(HID, 1); no hidden activation leaves the SM. The dots are exact fp32 (input_precision
"ieee"), or with `bf16=True` (the bf16 planner) bf16 operands with fp32 accumulation (tensor cores).

The oracle is the planner's own PyTorch cost, `lewm.plan.reach.GoalCost` (tests/test_reach_cost.py);
this module holds only the Triton path, `fused_reach_cost(...)`, launched through `_utils.launch`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _utils
from .rollout import _act, _dot  # exact GELU (ACT 2); the dot modes: 0 exact fp32, 1 in b's dtype

MODES = {"reach": 0, "mix": 1}


@triton.jit
def _piece(P, G, rows, goal, cols, m2, stride_p, stride_g, J: tl.constexpr):
    """Columns `cols` of piece J of x = [p, g, g - p] for the rows (zeros outside the masks)."""
    if J == 0:
        x = tl.load(P + rows[:, None] * stride_p + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    elif J == 1:
        x = tl.load(G + goal[:, None] * stride_g + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    else:
        x = tl.load(G + goal[:, None] * stride_g + cols[None, :], mask=m2, other=0.0).to(tl.float32) \
            - tl.load(P + rows[:, None] * stride_p + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    return x


@triton.jit
def _reach_cost_kernel(P, G, LNW, LNB, W1, B1, W2, B2, W3, B3, OUT,
                       N, D, HID, PER_GOAL, stride_p, stride_g, weight, eps,
                       DEPTH: tl.constexpr, MODE: tl.constexpr, BF16: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_O: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    goal = rows // PER_GOAL
    kk = tl.arange(0, BLOCK_K)
    # LayerNorm statistics over the 3D features, two passes over D in chunks (mean, then centred squares)
    s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    l2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_K):
        cols = d0 + kk
        m2 = rmask[:, None] & (cols < D)[None, :]
        for j in tl.static_range(3):
            x = _piece(P, G, rows, goal, cols, m2, stride_p, stride_g, j)
            s += tl.sum(x, axis=1)
            if j == 2:
                l2 += tl.sum(x * x, axis=1)
    mean = s / (3.0 * D)
    ss = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_K):
        cols = d0 + kk
        m2 = rmask[:, None] & (cols < D)[None, :]
        for j in tl.static_range(3):
            x = tl.where(m2, _piece(P, G, rows, goal, cols, m2, stride_p, stride_g, j) - mean[:, None], 0.0)
            ss += tl.sum(x * x, axis=1)
    rstd = 1.0 / tl.sqrt(ss / (3.0 * D) + eps)
    # layer 1: h = GELU(LN(x) @ W1^T + b1), K = 3D in chunks of BLOCK_K per piece; W1 (HID, 3D) row-major
    hcols = tl.arange(0, BLOCK_H)
    hmask = hcols < HID
    h = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_K):
        cols = d0 + kk
        cmask = cols < D
        m2 = rmask[:, None] & cmask[None, :]
        for j in tl.static_range(3):
            x = _piece(P, G, rows, goal, cols, m2, stride_p, stride_g, j)
            lw = tl.load(LNW + j * D + cols, mask=cmask, other=0.0)
            lb = tl.load(LNB + j * D + cols, mask=cmask, other=0.0)
            x = tl.where(m2, (x - mean[:, None]) * rstd[:, None] * lw[None, :] + lb[None, :], 0.0)
            w = tl.load(W1 + hcols[None, :] * (3 * D) + j * D + cols[:, None],
                        mask=cmask[:, None] & hmask[None, :], other=0.0)
            h += _dot(x, w.to(tl.bfloat16), 1) if BF16 else _dot(x, w, 0)
    h = _act(h + tl.load(B1 + hcols, mask=hmask, other=0.0)[None, :], 2)
    h = tl.where(rmask[:, None] & hmask[None, :], h, 0.0)
    if DEPTH == 1:
        logit = tl.sum(h * tl.load(W3 + hcols, mask=hmask, other=0.0)[None, :], axis=1)
    else:
        # layer 2 in blocks of BLOCK_O outputs, each folded into the final Linear(HID, 1) at once
        logit = tl.zeros((BLOCK_M,), dtype=tl.float32)
        hd = h.to(tl.bfloat16) if BF16 else h
        for o0 in range(0, HID, BLOCK_O):
            ocols = o0 + tl.arange(0, BLOCK_O)
            omask = ocols < HID
            w2 = tl.load(W2 + ocols[None, :] * HID + hcols[:, None], mask=hmask[:, None] & omask[None, :],
                         other=0.0)
            h2 = _dot(hd, w2.to(tl.bfloat16), 1) if BF16 else _dot(hd, w2, 0)
            h2 = _act(h2 + tl.load(B2 + ocols, mask=omask, other=0.0)[None, :], 2)
            w3 = tl.load(W3 + ocols, mask=omask, other=0.0)
            logit += tl.sum(tl.where(omask[None, :], h2 * w3[None, :], 0.0), axis=1)
    logit += tl.load(B3)
    r = 1.0 / (1.0 + tl.exp(-logit))
    if MODE == 0:
        cost = r
    else:
        cost = l2 / D + weight * r
    tl.store(OUT + rows, cost, mask=rmask)


MAX_HIDDEN = 512  # the hidden activations of BLOCK_M rows stay in registers


def fusable(head) -> bool:
    """Whether the kernel takes this head: depth 1 or 2, hidden width <= MAX_HIDDEN."""
    return head.depth in (1, 2) and head.hidden <= MAX_HIDDEN


def head_tensors(head) -> dict:
    """The ReachHead's parameters as the kernel reads them (fp32, contiguous). Depth 1 or 2 only."""
    if not fusable(head):
        raise ValueError(f"fused_reach_cost: a head of depth {head.depth}, hidden {head.hidden} (the kernel "
                         f"takes depth 1 or 2, hidden <= {MAX_HIDDEN})")
    net = head.net
    ln, lin = net[0], [m for m in net if isinstance(m, torch.nn.Linear)]
    f = (lambda t: t.detach().float().contiguous())
    t = {"ln_w": f(ln.weight), "ln_b": f(ln.bias), "eps": float(ln.eps), "w1": f(lin[0].weight), "b1": f(lin[0].bias),
         "w3": f(lin[-1].weight).reshape(-1), "b3": f(lin[-1].bias), "depth": head.depth, "hidden": head.hidden}
    if head.depth == 2:
        t.update(w2=f(lin[1].weight), b2=f(lin[1].bias))
    return t


def fused_reach_cost(tensors: dict, pred: torch.Tensor, goal: torch.Tensor, mode: str, weight: float = 1.0,
                     out: torch.Tensor | None = None, bf16: bool = False) -> torch.Tensor:
    """pred (N, D) final latents (any float dtype, rows contiguous), goal (E, D), N a multiple of E ->
    (N,) fp32 costs. `tensors`: head_tensors(head), on pred's device. `bf16`: the two GEMMs on bf16
    operands with fp32 accumulation (tensor cores; the bf16 planner's choice), else exact fp32."""
    if mode not in MODES:
        raise ValueError(f"fused_reach_cost: mode must be one of {', '.join(MODES)}, got {mode!r}")
    N, D = pred.shape
    E = goal.shape[0]
    if goal.shape[1] != D or N % E:
        raise ValueError(f"fused_reach_cost: pred {tuple(pred.shape)} and goal {tuple(goal.shape)} do not match")
    if pred.stride(1) != 1 or goal.stride(1) != 1:
        raise ValueError("fused_reach_cost: pred and goal need contiguous rows")
    hid = tensors["hidden"]
    if tensors["w1"].shape != (hid, 3 * D):
        raise ValueError(f"fused_reach_cost: the head takes latents of {tensors['w1'].shape[1] // 3} dims, got {D}")
    out = torch.empty(N, device=pred.device, dtype=torch.float32) if out is None else out
    bh = _utils.p2(hid)
    # sm_90, 0 spills fp32 and bf16 (compiled by profiles/kernels_sm90.py): 16-row programs (HMMA in bf16)
    # while they fill no more than the chip; past 132 programs of 64 rows, 64-row programs (HGMMA in bf16)
    # read the weights from L2 4x less often
    block_m, block_k, block_o = 16, 16, 16
    num_warps = 4 if bh <= 256 else 8
    if _utils.gpu_tiles() and bh <= 256 and triton.cdiv(N, 64) >= 132:
        block_m, num_warps = 64, 8
    w2, b2 = tensors.get("w2", tensors["w1"]), tensors.get("b2", tensors["b1"])
    ctas = triton.cdiv(N, block_m)
    depth2 = tensors["depth"] == 2
    _utils.launch(_reach_cost_kernel, (ctas,),
                  pred, goal, tensors["ln_w"], tensors["ln_b"], tensors["w1"], tensors["b1"], w2, b2,
                  tensors["w3"], tensors["b3"], out, N, D, hid, N // E, pred.stride(0), goal.stride(0),
                  float(weight), tensors["eps"],
                  DEPTH=tensors["depth"], MODE=MODES[mode], BF16=bool(bf16), BLOCK_M=block_m, BLOCK_K=block_k,
                  BLOCK_H=bh, BLOCK_O=block_o, num_warps=num_warps, num_stages=1,
                  tag="reach_cost",
                  cost={"flops": 2 * N * (3 * D * hid + (hid * hid if depth2 else 0) + hid),
                        "hbm_bytes": pred.element_size() * N * D
                        + 4 * (N + E * D + hid * (3 * D + (hid if depth2 else 0) + 3)),
                        "l2_bytes": 3 * pred.element_size() * N * D + 4 * ctas * hid * (3 * D + (hid if depth2 else 0))})
    return out
