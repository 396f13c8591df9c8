"""Fused predictor rollout: N candidate action sequences rolled out through the AdaLN-zero predictor
at once, with the terminal planning cost fused into the last step.

What is computed (the planner's model, `lewm.LeWM.rollout` + the CEM cost): for z0 (N, C, D) context
latents, actions (N, H, A) z-scored macro actions and goal latents g (E, D) (candidate n belongs to
goal n // (N / E)),

    e_t     = ActionEncoder(a_t)                                    (N, H, D)
    for i = C-1 .. H-1:                                             (one step per predicted frame)
        window = frames lo .. i, lo = max(0, i + 1 - W)            (W = history = 3)
        x      = z[window] + pos[0 : len(window)]                   (absolute positions in the window)
        x      = Predictor blocks (causal, token t modulated by e_{lo+t}) -> final LayerNorm
        z[i+1] = pred_proj(x[last])                                 (Linear -> BN(eval) -> GELU -> Linear)
    cost    = || z[H] - g ||^2                                      (N,)

Exactness and the KV cache. The positional embedding is absolute and added to the window's input, so
a cache is exact only while the window grows: at step i with lo = 0, tokens 0 .. i-1 sit at the same
positions as in the previous step and their per-layer keys/values are unchanged, so only the new
token runs through the layers. Once the window slides (lo > 0) every token moves to a new position,
so the whole window (W tokens) is recomputed through every layer: anything else changes the model's
answer. With one context frame and horizon 5 this is 1 + 1 + 1 + 3 + 3 = 9 token-passes per
candidate, against 1 + 2 + 3 + 3 + 3 = 12 for the cache-free reference. Two further savings are exact
too: the AdaLN modulation of a token depends only on its action, so it is computed once for all H
actions and all layers (H token-passes of the modulation GEMM instead of 12 x depth); and in the last
layer only the last token's output is used, so there only the qkv projection runs for the other tokens
(their keys and values), while attention, out-projection and MLP run for the last token alone.

Two implementations of the same fused computation live here:

* `rollout_reference(w, z0, actions, goal)`: plain PyTorch, KV cache, readable; the oracle for the
  kernels and the CPU fast path of the planner (also what `torch.compile` compiles).
* `fused_rollout(w, z0, actions, goal)`: Triton. Per rollout step, 4 kernels per layer + 2:

    1. `_norm_matmul_kernel`  LN(no affine, eps 1e-6) -> modulate(shift, scale) -> LN(affine) -> x @ W_qkv;
                              writes q, k, v of the new tokens straight into the per-layer KV cache.
                              In layer 0 it also builds the residual input z + pos (the "embed").
    2. `_attn_out_kernel`     causal attention over <= W keys in registers (online softmax, no tl.dot:
                              3 keys), then @ W_out (tl.dot, one head at a time as the K loop),
                              + bias, gated residual x += gate * out, in place.
    3. `_norm_matmul_kernel`  LN -> modulate -> LN -> x @ W_fc1 + b -> GELU  (MLP hidden, (M, 2048))
    4. `_matmul_kernel`       hidden @ W_fc2 + b, gated residual x += gate * out
    final: `_norm_matmul_kernel` (final affine LN -> pred_proj fc1 with the eval BatchNorm folded in ->
           GELU), `_matmul_kernel` (fc2 + b -> z[i+1], and on the last step the cost ||z - g||^2).

  Before the steps, three `_matmul_kernel` launches turn all N*H actions into the modulation table
  (N, H, depth, 6, D): (Conv1d k=1 folded into the first Linear) -> SiLU -> Linear -> SiLU -> the six
  stacked adaLN Linears of every layer. A rollout is 3 + 1 copy + steps x (4 * depth + 2) launches:
  134 at the default size (depth 6, horizon 5), against ~165 eager kernels per predictor call (x 5).
  Each GEMM kernel's grid covers rows x output columns: at N = 300 rows and the default GPU tiles
  (BLOCK_M 32, BLOCK_N 64) qkv gets 480 programs and fc1 320, but the D-wide outputs (out projection,
  fc2) only 30: `tiles=` overrides them, and tuning them is work for a GPU session.

  GEMMs use tl.dot with fp32 accumulation; weights (and the GEMM inputs, KV cache, MLP hidden) in the
  weights' dtype (float32 or bfloat16), the residual stream, LayerNorm statistics, softmax, the
  modulation table and the latents in float32. float32 dots use input_precision="ieee" (not tf32),
  so fp32 results match eager PyTorch to rounding.

Weights come packed as a `RolloutWeights` (stacked per-layer tensors; GEMM weights stored (in, out)
so tiles load along rows). This package never imports `lewm`: `lewm.plan.engine.pack_predictor` turns
a model into one.

Runs on triton 3.6 (GPU machines) and 3.9, and under TRITON_INTERPRET=1 on CPU tensors: plain
pointer arithmetic, no tl.make_block_ptr, no autotuning (tile sizes from `_tiles`). All tile dims are
>= 16 (asserted: the interpreter does not check tl.dot's minimum), so model dims below 16 (the action
width, 10) are handled by masked, zero-padded tiles. In the interpreter, bf16 dots are computed in
fp32 (its native bf16 dot is wrong, triton issue #11584).

Everything the rollout launches depends only on Python ints derived from shapes: no host
synchronisation, so it can be captured in a CUDA graph.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

__all__ = [
    "RolloutWeights",
    "RolloutWorkspace",
    "fused_rollout",
    "rollout_reference",
    "action_modulation_reference",
    "rollout_schedule",
    "token_passes",
]

# Dot modes (constexpr): how a tile product is computed.
_DOT_IEEE = 0  # fp32 x fp32, input_precision="ieee" (exact fp32, no tf32)
_DOT_NATIVE = 1  # A cast to the weights' dtype (bf16 / fp16), tensor cores, fp32 accumulation
_DOT_UPCAST = 2  # both operands to fp32 (the interpreter's answer to bf16 weights)

# Epilogues of `_matmul_kernel` (constexpr).
_EPI_STORE = 0  # out = act(A @ W + b)
_EPI_RESIDUAL = 1  # out += gate * (A @ W + b)     (out: the fp32 residual stream)
_EPI_COST = 2  # out = A @ W + b; cost[n] = ||out - goal[n // rows_per_goal]||^2

_ACT_NONE, _ACT_SILU, _ACT_GELU = 0, 1, 2


# ----------------------------------------------------------------------------------------------------
# Packed weights
# ----------------------------------------------------------------------------------------------------

_GEMM_FIELDS = ("act_w1", "act_w2", "mod_w", "qkv_w", "out_w", "fc1_w", "fc2_w", "head_w1", "head_w2")


@dataclass
class RolloutWeights:
    """The predictor, action encoder and pred_proj as plain tensors (L = depth, D = dim, I = heads *
    dim_head, F = MLP width, P = pred_proj width, Ha = action-encoder width, A = action width).

    GEMM weights are stored (in, out), i.e. transposed from nn.Linear, in one dtype (float32 or
    bfloat16); LayerNorm parameters, biases and the positional embedding stay float32."""

    depth: int
    heads: int
    dim_head: int
    history: int
    eps_mod: float  # the no-affine LayerNorm before modulate (1e-6)
    eps_attn: float  # attention's own affine LayerNorm
    eps_mlp: float  # the MLP's own affine LayerNorm
    eps_out: float  # the predictor's final LayerNorm
    pos: torch.Tensor  # (W, D)
    act_w1: torch.Tensor  # (A, Ha)  Conv1d(k=1) folded into the first Linear
    act_b1: torch.Tensor  # (Ha,)
    act_w2: torch.Tensor  # (Ha, D)
    act_b2: torch.Tensor  # (D,)
    # (D, L*6*D): the adaLN Linears of all layers; columns [l][shift_a, scale_a, gate_a, shift_m, scale_m, gate_m]
    mod_w: torch.Tensor
    mod_b: torch.Tensor  # (L*6*D,)
    attn_ln_w: torch.Tensor  # (L, D)
    attn_ln_b: torch.Tensor  # (L, D)
    qkv_w: torch.Tensor  # (L, D, 3I)   columns [q | k | v], head-major inside each
    out_w: torch.Tensor  # (L, I, D)
    out_b: torch.Tensor  # (L, D)
    mlp_ln_w: torch.Tensor  # (L, D)
    mlp_ln_b: torch.Tensor  # (L, D)
    fc1_w: torch.Tensor  # (L, D, F)
    fc1_b: torch.Tensor  # (L, F)
    fc2_w: torch.Tensor  # (L, F, D)
    fc2_b: torch.Tensor  # (L, D)
    norm_w: torch.Tensor  # (D,)
    norm_b: torch.Tensor  # (D,)
    head_w1: torch.Tensor  # (D, P)  eval BatchNorm folded in
    head_b1: torch.Tensor  # (P,)
    head_w2: torch.Tensor  # (P, D)
    head_b2: torch.Tensor  # (D,)

    # -- dims ------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.pos.shape[1]

    @property
    def inner(self) -> int:
        return self.heads * self.dim_head

    @property
    def action_width(self) -> int:
        return self.act_w1.shape[0]

    @property
    def mlp(self) -> int:
        return self.fc1_w.shape[2]

    @property
    def proj_hidden(self) -> int:
        return self.head_w1.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        """The GEMM weights' dtype."""
        return self.qkv_w.dtype

    @property
    def device(self) -> torch.device:
        return self.pos.device

    def tensors(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if torch.is_tensor(getattr(self, f.name))}

    def to(self, device=None, dtype: torch.dtype | None = None) -> "RolloutWeights":
        """A copy on `device` with GEMM weights in `dtype` (the rest stays float32)."""
        upd = {}
        for name, t in self.tensors().items():
            dt = dtype if (dtype is not None and name in _GEMM_FIELDS) else t.dtype
            upd[name] = t.to(device=device if device is not None else t.device, dtype=dt).contiguous()
        return replace(self, **upd)

    def validate(self) -> "RolloutWeights":
        """Check every shape against the dims; raise ValueError naming the first bad field."""
        L, D, I, W = self.depth, self.dim, self.inner, self.history
        A, Ha, Fm, P = self.action_width, self.act_w1.shape[1], self.mlp, self.proj_hidden
        want = {
            "pos": (W, D), "act_w1": (A, Ha), "act_b1": (Ha,), "act_w2": (Ha, D), "act_b2": (D,),
            "mod_w": (D, L * 6 * D), "mod_b": (L * 6 * D,), "attn_ln_w": (L, D), "attn_ln_b": (L, D),
            "qkv_w": (L, D, 3 * I), "out_w": (L, I, D), "out_b": (L, D), "mlp_ln_w": (L, D),
            "mlp_ln_b": (L, D), "fc1_w": (L, D, Fm), "fc1_b": (L, Fm), "fc2_w": (L, Fm, D),
            "fc2_b": (L, D), "norm_w": (D,), "norm_b": (D,), "head_w1": (D, P), "head_b1": (P,),
            "head_w2": (P, D), "head_b2": (D,),
        }
        dev = self.device
        for name, shape in want.items():
            t = getattr(self, name)
            if tuple(t.shape) != shape:
                raise ValueError(f"RolloutWeights.{name} has shape {tuple(t.shape)}, expected {shape}")
            if t.device != dev:
                raise ValueError(f"RolloutWeights.{name} is on {t.device}, the others on {dev}")
            want_dt = (torch.float32, torch.bfloat16, torch.float16) if name in _GEMM_FIELDS else (torch.float32,)
            if t.dtype not in want_dt:
                raise ValueError(f"RolloutWeights.{name} has dtype {t.dtype}, expected one of {want_dt}")
            if name in _GEMM_FIELDS and t.dtype != self.dtype:
                raise ValueError(f"RolloutWeights.{name} is {t.dtype} but qkv_w is {self.dtype}: "
                                 "all GEMM weights share one dtype")
        if min(L, self.heads, self.dim_head, W) <= 0:
            raise ValueError("RolloutWeights: depth, heads, dim_head and history must be positive")
        return self


# ----------------------------------------------------------------------------------------------------
# The schedule (shared by both implementations)
# ----------------------------------------------------------------------------------------------------


def rollout_schedule(context: int, horizon: int, history: int) -> list:
    """The rollout's steps as (i, lo, p0, T): predict frame i+1 from window frames lo..i (T = i+1-lo
    tokens, at positions 0..T-1), of which tokens p0..T-1 are new (run through the layers) and
    0..p0-1 come from the KV cache. p0 > 0 only while the window grows (lo stays 0)."""
    if context < 1 or horizon < context:
        raise ValueError(f"rollout needs 1 <= context ({context}) <= horizon ({horizon})")
    steps, lo_prev, t_prev = [], -1, 0
    for i in range(context - 1, horizon):
        lo = max(0, i + 1 - history)
        T = i + 1 - lo
        p0 = t_prev if lo == lo_prev else 0  # same window start: the cached tokens keep their positions
        steps.append((i, lo, p0, T))
        lo_prev, t_prev = lo, T
    return steps


def token_passes(context: int, horizon: int, history: int) -> tuple:
    """(with the KV cache, without): tokens pushed through the layers per candidate.
    context 1, horizon 5, history 3 -> (9, 12)."""
    cached = sum(T - p0 for _, _, p0, T in rollout_schedule(context, horizon, history))
    full = sum(T for _, _, _, T in rollout_schedule(context, horizon, history))
    return cached, full


# ----------------------------------------------------------------------------------------------------
# The plain-PyTorch reference of the fused computation (oracle and CPU fast path)
# ----------------------------------------------------------------------------------------------------


def _mm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ w (K, N) [+ b] -> float32, the product in the weights' dtype (as the kernels'
    dot inputs). fp32: one addmm (the bias fused into the GEMM)."""
    shape = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if w.dtype == torch.float32:
        y = torch.addmm(b, x2, w) if b is not None else x2 @ w
    else:
        y = (x2.to(w.dtype) @ w).float()
        if b is not None:
            y = y + b
    return y.view(*shape, w.shape[1])


def action_modulation_reference(w: RolloutWeights, actions: torch.Tensor) -> torch.Tensor:
    """(N, H, A) z-scored actions -> (N, H, L, 6, D) AdaLN modulation: for each action and layer
    (shift_a, scale_a, gate_a, shift_m, scale_m, gate_m). Computed once per rollout."""
    N, H, _ = actions.shape
    h = F.silu(_mm(actions, w.act_w1, w.act_b1))
    e = _mm(h, w.act_w2, w.act_b2)  # the action embedding c
    m = _mm(F.silu(e), w.mod_w, w.mod_b)  # SiLU -> Linear of every block at once
    return m.view(N, H, w.depth, 6, w.dim)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q0: int) -> torch.Tensor:
    """Causal attention over a window of T <= history tokens, queries at positions q0..T-1.
    q (N, Tq, h, dh), k, v (N, T, h, dh) -> (N, Tq, h, dh). With T <= 3 keys, broadcasting in the
    (token, head) layout of the qkv projection beats batched GEMMs or SDPA (no transposes, no copies)."""
    T = k.shape[1]
    s = (q[:, :, None] * k[:, None]).sum(-1) * (q.shape[-1] ** -0.5)  # (N, Tq, T, h)
    if T - q0 > 1:  # some queries must not see later keys
        keep = torch.arange(T, device=q.device)[None, :] <= torch.arange(q0, T, device=q.device)[:, None]
        s = s.masked_fill(~keep[None, :, :, None], float("-inf"))
    p = s.softmax(2)
    return (p[..., None] * v[:, None]).sum(2)


def _terminal_cost(z: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
    """z (N, D), goal (E, D) with N = E * S -> (N,) squared L2 of each row to its goal."""
    N, D = z.shape
    E = goal.shape[0]
    return (z.view(E, N // E, D) - goal[:, None].float()).pow(2).sum(-1).reshape(N)


def rollout_reference(w: RolloutWeights, z0: torch.Tensor, actions: torch.Tensor,
                      goal: torch.Tensor | None = None, *, check: bool = True):
    """The fused rollout in plain PyTorch, KV-cache version (see the module docstring).

    z0 (N, C, D) context latents, actions (N, H, A) z-scored, goal (E, D) or None, with N % E == 0.
    Returns (preds (N, H - C + 1, D) float32: the latents after actions C-1 .. H-1, exactly what
    `LeWM.rollout` returns; cost (N,) float32 or None). No host synchronisation."""
    if check:
        z0, actions, goal = _check_inputs(w, z0, actions, goal, need_kernel_device=False)
    N, C, D = z0.shape
    H = actions.shape[1]
    L, nh, dh = w.depth, w.heads, w.dim_head
    mod = action_modulation_reference(w, actions)  # (N, H, L, 6, D)
    mod[:, :, :, 1] += 1  # modulate(x) = x * (1 + scale) + shift: add the 1 once, not per token-pass
    mod[:, :, :, 4] += 1
    frames = list(z0.float().unbind(1))  # latents of frames 0..C-1; predictions are appended
    kc: list = [None] * L  # per layer (N, T, nh, dh): keys of the window's tokens
    vc: list = [None] * L
    preds = []
    for i, lo, p0, T in rollout_schedule(C, H, w.history):
        x = torch.stack(frames[lo + p0:i + 1], 1) + w.pos[p0:T]  # (N, Tn, D): the new tokens
        for l in range(L):
            # (1 + scale) already in the table
            shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod[:, lo + p0:i + 1, l].unbind(2)
            # LN (no affine) -> modulate -> the attention's own affine LN
            h = torch.addcmul(shift_a, F.layer_norm(x, (D,), eps=w.eps_mod), scale_a)
            h = F.layer_norm(h, (D,), w.attn_ln_w[l], w.attn_ln_b[l], w.eps_attn)
            q, k, v = _mm(h, w.qkv_w[l]).view(N, T - p0, 3, nh, dh).unbind(2)  # (N, Tn, nh, dh)
            if p0 > 0:  # the cached tokens' keys and values (same positions as last step)
                k, v = torch.cat([kc[l], k], 1), torch.cat([vc[l], v], 1)
            kc[l], vc[l] = k, v
            q0 = p0
            if l == L - 1 and T - p0 > 1:  # last layer: only the last token's output is used
                q0 = T - 1
                x, q = x[:, -1:], q[:, -1:]
                gate_a, shift_m, scale_m, gate_m = (t[:, -1:] for t in (gate_a, shift_m, scale_m, gate_m))
            o = _attend(q, k, v, q0).reshape(N, T - q0, nh * dh)
            x = torch.addcmul(x, gate_a, _mm(o, w.out_w[l], w.out_b[l]))  # gated residual
            h = torch.addcmul(shift_m, F.layer_norm(x, (D,), eps=w.eps_mod), scale_m)
            h = F.layer_norm(h, (D,), w.mlp_ln_w[l], w.mlp_ln_b[l], w.eps_mlp)
            x = torch.addcmul(x, gate_m, _mm(F.gelu(_mm(h, w.fc1_w[l], w.fc1_b[l])), w.fc2_w[l], w.fc2_b[l]))
        h = F.layer_norm(x[:, -1], (D,), w.norm_w, w.norm_b, w.eps_out)  # final LN, last token only
        z = _mm(F.gelu(_mm(h, w.head_w1, w.head_b1)), w.head_w2, w.head_b2)  # pred_proj (BN folded)
        frames.append(z)
        preds.append(z)
    preds = torch.stack(preds, 1)
    cost = _terminal_cost(preds[:, -1], goal) if goal is not None else None
    return preds, cost


# ----------------------------------------------------------------------------------------------------
# Input checks (shared)
# ----------------------------------------------------------------------------------------------------


def _interpreted() -> bool:
    """True when the kernels below were built by the Triton interpreter (TRITON_INTERPRET=1 set
    before this module was imported): then they run on CPU tensors."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
        return isinstance(_matmul_kernel, InterpretedFunction)
    except ImportError:  # pragma: no cover
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_inputs(w: RolloutWeights, z0, actions, goal, need_kernel_device: bool):
    """Validate and normalise (N, C, D) z0, (N, H, A) actions, (E, D) goal. Floating inputs of another
    dtype are cast to float32 and non-contiguous ones copied (both cheap next to a rollout); anything
    else raises ValueError / TypeError with the argument's name."""
    dev = w.device
    if need_kernel_device:
        if _interpreted():
            if dev.type != "cpu":
                raise ValueError("fused_rollout: TRITON_INTERPRET=1 runs the kernels on CPU tensors, "
                                 f"but the weights are on {dev}")
        elif dev.type != "cuda":
            raise ValueError(f"fused_rollout: the Triton kernels need CUDA tensors, the weights are on {dev} "
                             "(use rollout_reference on the CPU, or set TRITON_INTERPRET=1 before import)")
    out = []
    for name, t, rank in (("z0", z0, 3), ("actions", actions, 3), ("goal", goal, 2)):
        if t is None:
            out.append(None)
            continue
        if not torch.is_tensor(t):
            raise TypeError(f"rollout: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != dev:
            raise ValueError(f"rollout: {name} is on {t.device} but the weights are on {dev}")
        if not t.is_floating_point():
            raise TypeError(f"rollout: {name} must be a floating tensor, got {t.dtype}")
        if t.dim() != rank:
            raise ValueError(f"rollout: {name} must have {rank} dims, got shape {tuple(t.shape)}")
        out.append(t.float().contiguous())
    z0, actions, goal = out
    N, C, D = z0.shape
    if D != w.dim:
        raise ValueError(f"rollout: z0 has latent width {D}, the model's is {w.dim}")
    if N == 0 or C == 0:
        raise ValueError(f"rollout: z0 {tuple(z0.shape)} is empty")
    if actions.shape[0] != N:
        raise ValueError(f"rollout: z0 holds {N} candidates but actions {actions.shape[0]}")
    if actions.shape[2] != w.action_width:
        raise ValueError(f"rollout: actions have width {actions.shape[2]}, the model expects {w.action_width}")
    if actions.shape[1] < C:
        raise ValueError(f"rollout needs at least as many actions ({actions.shape[1]}) as context frames ({C})")
    if goal is not None:
        if goal.shape[1] != D:
            raise ValueError(f"rollout: goal has width {goal.shape[1]}, the model's is {D}")
        if goal.shape[0] == 0 or N % goal.shape[0] != 0:
            raise ValueError(f"rollout: {N} candidates cannot be split evenly over {goal.shape[0]} goals")
    return z0, actions, goal


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, DOT: tl.constexpr):
    """a (BM, BK) float32 @ b (BK, BN) weights -> float32, by DOT mode (see _DOT_*)."""
    if DOT == 0:
        r = tl.dot(a, b.to(tl.float32), input_precision="ieee")
    elif DOT == 1:
        r = tl.dot(a.to(b.dtype), b)
    else:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return r


@triton.jit
def _act(x, ACT: tl.constexpr):
    if ACT == 1:  # SiLU
        x = x / (1.0 + tl.exp(-x))
    elif ACT == 2:  # exact (erf) GELU, as nn.GELU()
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    return x


@triton.jit
def _norm_matmul_kernel(
    x_ptr, s_xn, s_xt,  # input rows: row (n, t) at x_ptr + n*s_xn + t*s_xt (D floats)
    pos_ptr,  # EMBED: (TN, D) positional rows added to the input
    xo_ptr, s_xon, s_xot,  # EMBED: where the embedded residual rows are written
    mod_ptr, s_mn, s_mt,  # MODULATE: shift at mod_ptr + n*s_mn + t*s_mt, scale D floats further
    lnw_ptr, lnb_ptr,  # the affine LayerNorm (D,)
    w_ptr, s_wk, b_ptr,  # weight (D, NOUT) with row stride s_wk; bias (NOUT,)
    out_ptr, s_on, s_ot,  # output rows (NOUT values each, any float dtype)
    M, TN, D, NOUT, eps_mod, eps_ln,
    EMBED: tl.constexpr, MODULATE: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[r, cols] = act(LN_affine(modulate(LN(x[r]), shift[r], scale[r])) @ W[:, cols] + b[cols]).

    Rows r = n * TN + t (M = N * TN). Grid (cdiv(M, BLOCK_M), cdiv(NOUT, BLOCK_N)); every program
    holds whole rows (BLOCK_D >= D) so both LayerNorms are computed in registers, and the tile product
    runs over K = D at once. Without MODULATE only the affine LayerNorm is applied (the final norm)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    n = (rows // TN).to(tl.int64)
    t = (rows % TN).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    m2 = rmask[:, None] & dmask[None, :]

    x = tl.load(x_ptr + n[:, None] * s_xn + t[:, None] * s_xt + d[None, :], mask=m2, other=0.0).to(tl.float32)
    if EMBED:
        x += tl.load(pos_ptr + t[:, None] * D + d[None, :], mask=m2, other=0.0)
        if pid_n == 0:  # every column block computes the same rows; one writes them
            tl.store(xo_ptr + n[:, None] * s_xon + t[:, None] * s_xot + d[None, :], x, mask=m2)
    if MODULATE:
        mean = tl.sum(x, axis=1) / D
        xc = tl.where(m2, x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / D
        x = xc * (1.0 / tl.sqrt(var + eps_mod))[:, None]
        mrow = mod_ptr + n[:, None] * s_mn + t[:, None] * s_mt + d[None, :]
        shift = tl.load(mrow, mask=m2, other=0.0)
        scale = tl.load(mrow + D, mask=m2, other=0.0)
        x = x * (1.0 + scale) + shift
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(m2, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / D
    g = tl.load(lnw_ptr + d, mask=dmask, other=0.0)
    bb = tl.load(lnb_ptr + d, mask=dmask, other=0.0)
    h = xc * (1.0 / tl.sqrt(var + eps_ln))[:, None] * g[None, :] + bb[None, :]  # padded cols: 0

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < NOUT
    wt = tl.load(w_ptr + d[:, None] * s_wk + cols[None, :], mask=dmask[:, None] & cmask[None, :], other=0.0)
    acc = _dot(h, wt, DOT)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cmask, other=0.0)[None, :]
    acc = _act(acc, ACT)
    o = out_ptr + n[:, None] * s_on + t[:, None] * s_ot + cols[None, :]
    tl.store(o, acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _attn_out_kernel(
    qkv_ptr, s_qn, s_qs,  # per-layer cache (N, W, 3I): slot s of candidate n at qkv_ptr + n*s_qn + s*s_qs
    w_ptr, s_wk, b_ptr,  # out projection (I, D), bias (D,)
    gate_ptr, s_gn, s_gt,  # gate rows (D floats) of the query tokens
    x_ptr, s_xn, s_xt,  # residual rows of the query tokens (updated in place)
    M, TQ, Q0, D, INNER, HEADS, DH, sm_scale,
    T_KEYS: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DH: tl.constexpr,
):
    """x[r, cols] += gate[r, cols] * (Attention(q_r; keys 0..slot_r) @ W_out[:, cols] + b[cols]).

    Rows r = n * TQ + t are query tokens at window slots Q0 + t; keys are slots 0..T_KEYS-1 (<= 3),
    causal. Attention runs in registers with an online softmax over the keys, one head at a time; each
    head's output (BLOCK_M, dh) is immediately multiplied into the out-projection accumulator (the
    heads are the K loop of that GEMM). Grid (cdiv(M, BLOCK_M), cdiv(D, BLOCK_N))."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    n = (rows // TQ).to(tl.int64)
    t = (rows % TQ).to(tl.int64)
    slot = Q0 + t
    e = tl.arange(0, BLOCK_DH)
    emask = e < DH
    me = rmask[:, None] & emask[None, :]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < D
    base = qkv_ptr + n[:, None] * s_qn  # (BLOCK_M, 1)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for hd in range(HEADS):
        off = hd * DH + e[None, :]
        q = tl.load(base + slot[:, None] * s_qs + off, mask=me, other=0.0).to(tl.float32) * sm_scale
        k = tl.load(base + INNER + off, mask=me, other=0.0).to(tl.float32)
        v = tl.load(base + 2 * INNER + off, mask=me, other=0.0).to(tl.float32)
        m_i = tl.sum(q * k, axis=1)  # key 0 is visible to every query
        l_i = tl.full((BLOCK_M,), 1.0, tl.float32)
        o = v
        for j in tl.static_range(1, T_KEYS):
            k = tl.load(base + j * s_qs + INNER + off, mask=me, other=0.0).to(tl.float32)
            v = tl.load(base + j * s_qs + 2 * INNER + off, mask=me, other=0.0).to(tl.float32)
            s = tl.where(slot >= j, tl.sum(q * k, axis=1), float("-inf"))
            m_new = tl.maximum(m_i, s)
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new)
            l_i = l_i * alpha + p
            o = o * alpha[:, None] + p[:, None] * v
            m_i = m_new
        o = o / l_i[:, None]
        wt = tl.load(w_ptr + (hd * DH + e)[:, None] * s_wk + cols[None, :],
                     mask=emask[:, None] & cmask[None, :], other=0.0)
        acc += _dot(o, wt, DOT)

    acc += tl.load(b_ptr + cols, mask=cmask, other=0.0)[None, :]
    m2 = rmask[:, None] & cmask[None, :]
    gate = tl.load(gate_ptr + n[:, None] * s_gn + t[:, None] * s_gt + cols[None, :], mask=m2, other=0.0)
    xp = x_ptr + n[:, None] * s_xn + t[:, None] * s_xt + cols[None, :]
    x = tl.load(xp, mask=m2, other=0.0)
    tl.store(xp, x + gate * acc, mask=m2)


@triton.jit
def _matmul_kernel(
    a_ptr, s_an, s_at,  # A rows (K values each): row (n, t) at a_ptr + n*s_an + t*s_at
    w_ptr, s_wk, b_ptr,  # weight (K, NOUT), bias (NOUT,)
    out_ptr, s_on, s_ot,  # output rows
    gate_ptr, s_gn, s_gt,  # EPI_RESIDUAL: gate rows
    goal_ptr, cost_ptr,  # EPI_COST: goals (E, NOUT) float32, costs (N,) float32
    M, TN, K, NOUT, ROWS_PER_GOAL,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, EPI: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """acc = A[r] @ W[:, cols] + b[cols] over rows r = n * TN + t, then by EPI:
    0: out = act(acc); 1: out += gate * acc (in place, fp32); 2: out = acc and, as BLOCK_N >= NOUT
    (one column block holds the whole row), cost[n] = sum_cols (acc - goal[n // ROWS_PER_GOAL])^2.
    Grid (cdiv(M, BLOCK_M), cdiv(NOUT, BLOCK_N)); K in BLOCK_K steps, fp32 accumulation."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    n = (rows // TN).to(tl.int64)
    t = (rows % TN).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < NOUT
    kk = tl.arange(0, BLOCK_K)
    arow = a_ptr + n[:, None] * s_an + t[:, None] * s_at

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = (k0 + kk) < K
        a = tl.load(arow + k0 + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        wt = tl.load(w_ptr + (k0 + kk)[:, None] * s_wk + cols[None, :],
                     mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc += _dot(a, wt, DOT)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cmask, other=0.0)[None, :]
    m2 = rmask[:, None] & cmask[None, :]
    op = out_ptr + n[:, None] * s_on + t[:, None] * s_ot + cols[None, :]
    if EPI == 1:
        gate = tl.load(gate_ptr + n[:, None] * s_gn + t[:, None] * s_gt + cols[None, :], mask=m2, other=0.0)
        x = tl.load(op, mask=m2, other=0.0)
        tl.store(op, x + gate * acc, mask=m2)
    else:
        acc = _act(acc, ACT)
        tl.store(op, acc.to(out_ptr.dtype.element_ty), mask=m2)
        if EPI == 2:
            g = tl.load(goal_ptr + (n // ROWS_PER_GOAL)[:, None] * NOUT + cols[None, :], mask=m2, other=0.0)
            dlt = tl.where(m2, acc - g, 0.0)
            tl.store(cost_ptr + n, tl.sum(dlt * dlt, axis=1), mask=rmask)


# ----------------------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------------------


def _p2(n: int, lo: int = 16, hi: int = 1 << 30) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _tiles(M: int, nout: int, k: int, interpreted: bool, override: dict | None = None) -> dict:
    """Tile sizes (a heuristic, no autotuning). In the interpreter a program costs ~20-40 ms of Python
    whatever its size, so tiles are as large as the problem (capped); on the GPU moderate tiles give
    enough programs for ~130 SMs at N = 300 rows. Every tl.dot dim is >= 16."""
    if interpreted:
        t = dict(BLOCK_M=_p2(M, hi=256), BLOCK_N=_p2(nout, hi=512), BLOCK_K=_p2(k, hi=512), num_warps=4)
    else:
        t = dict(BLOCK_M=_p2(M, hi=32), BLOCK_N=_p2(nout, hi=64), BLOCK_K=_p2(k, hi=64), num_warps=4)
    if override:
        t.update({k_: v for k_, v in override.items() if k_ in t})
    for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        v = t[name]
        assert v >= 16 and (v & (v - 1)) == 0, f"{name}={v}: tl.dot tiles must be powers of two >= 16"
    return t


def _dot_mode(w: RolloutWeights) -> int:
    if w.dtype == torch.float32:
        return _DOT_IEEE
    return _DOT_UPCAST if _interpreted() else _DOT_NATIVE


class RolloutWorkspace:
    """Preallocated buffers of one fused rollout shape (N candidates, C context, H actions), so repeated
    rollouts (the CEM iterations, a CUDA graph) allocate nothing:

    mod (N, H, L, 6, D) f32   act_h (N*H, Ha), act_e (N*H, D)   x (N, W, D) f32 residual stream
    z (N, H+1, D) f32 latents qkv (L, N, W, 3I) KV cache        hid (N, W, F) MLP hidden
    phid (N, P) pred_proj hidden                                cost (N,) f32
    (unmarked: the weights' dtype)."""

    def __init__(self, w: RolloutWeights, N: int, C: int, H: int):
        dev, dt, f32 = w.device, w.dtype, torch.float32
        L, D, W = w.depth, w.dim, w.history
        self.key = (N, C, H, dev, dt)
        self.mod = torch.empty(N, H, L, 6, D, device=dev, dtype=f32)
        self.act_h = torch.empty(N * H, w.act_w1.shape[1], device=dev, dtype=dt)
        self.act_e = torch.empty(N * H, D, device=dev, dtype=dt)
        self.x = torch.empty(N, W, D, device=dev, dtype=f32)
        self.z = torch.empty(N, H + 1, D, device=dev, dtype=f32)
        self.qkv = torch.empty(L, N, W, 3 * w.inner, device=dev, dtype=dt)
        self.hid = torch.empty(N, W, w.mlp, device=dev, dtype=dt)
        self.phid = torch.empty(N, w.proj_hidden, device=dev, dtype=dt)
        self.cost = torch.empty(N, device=dev, dtype=f32)


def _launch_matmul(a, s_a, M, TN, K, w_, s_wk, b, out, s_o, nout, *, act=_ACT_NONE, epi=_EPI_STORE,
                   gate=None, s_g=(0, 0), goal=None, cost=None, rows_per_goal=1, dot=_DOT_IEEE, tiles=None):
    interp = _interpreted()
    t = _tiles(M, nout, K, interp, tiles)
    if epi == _EPI_COST:
        t["BLOCK_N"] = _p2(nout)  # one column block holds the whole row (for the row's cost)
    grid = (triton.cdiv(M, t["BLOCK_M"]), triton.cdiv(nout, t["BLOCK_N"]))
    _matmul_kernel[grid](
        a, s_a[0], s_a[1], w_, s_wk, b if b is not None else w_, out, s_o[0], s_o[1],
        gate if gate is not None else out, s_g[0], s_g[1],
        goal if goal is not None else out, cost if cost is not None else out,
        M, TN, K, nout, rows_per_goal,
        HAS_BIAS=b is not None, ACT=act, EPI=epi, DOT=dot,
        BLOCK_M=t["BLOCK_M"], BLOCK_N=t["BLOCK_N"], BLOCK_K=t["BLOCK_K"], num_warps=t["num_warps"])


def _launch_norm_matmul(x, s_x, M, TN, D, lnw, lnb, w_, s_wk, b, out, s_o, nout, eps_ln, *, act=_ACT_NONE,
                        mod=None, s_m=(0, 0), eps_mod=1e-6, embed_pos=None, x_out=None, s_xo=(0, 0),
                        dot=_DOT_IEEE, tiles=None):
    interp = _interpreted()
    t = _tiles(M, nout, D, interp, tiles)
    grid = (triton.cdiv(M, t["BLOCK_M"]), triton.cdiv(nout, t["BLOCK_N"]))
    _norm_matmul_kernel[grid](
        x, s_x[0], s_x[1],
        embed_pos if embed_pos is not None else x,
        x_out if x_out is not None else x, s_xo[0], s_xo[1],
        mod if mod is not None else x, s_m[0], s_m[1],
        lnw, lnb, w_, s_wk, b if b is not None else lnb, out, s_o[0], s_o[1],
        M, TN, D, nout, eps_mod, eps_ln,
        EMBED=embed_pos is not None, MODULATE=mod is not None, HAS_BIAS=b is not None, ACT=act, DOT=dot,
        BLOCK_M=t["BLOCK_M"], BLOCK_N=t["BLOCK_N"], BLOCK_D=_p2(D), num_warps=t["num_warps"])


def _launch_attn_out(qkv_l, N, TQ, Q0, T, w: RolloutWeights, l, gate, s_g, x, s_x, dot, tiles=None):
    interp = _interpreted()
    D = w.dim
    M = N * TQ
    t = _tiles(M, D, w.dim_head, interp, tiles)
    grid = (triton.cdiv(M, t["BLOCK_M"]), triton.cdiv(D, t["BLOCK_N"]))
    _attn_out_kernel[grid](
        qkv_l, qkv_l.stride(0), qkv_l.stride(1), w.out_w[l], w.out_w.stride(1), w.out_b[l],
        gate, s_g[0], s_g[1], x, s_x[0], s_x[1],
        M, TQ, Q0, D, w.inner, w.heads, w.dim_head, 1.0 / math.sqrt(w.dim_head),
        T_KEYS=T, DOT=dot, BLOCK_M=t["BLOCK_M"], BLOCK_N=t["BLOCK_N"], BLOCK_DH=_p2(w.dim_head),
        num_warps=t["num_warps"])


def fused_rollout(w: RolloutWeights, z0: torch.Tensor, actions: torch.Tensor, goal: torch.Tensor | None = None,
                  *, workspace: RolloutWorkspace | None = None, tiles: dict | None = None):
    """The fused Triton rollout; see `_fused_rollout` (the kernels launch on the tensors' CUDA device:
    Triton itself launches on the current device, whatever the tensors' device)."""
    if torch.is_tensor(z0) and z0.is_cuda:  # (non-tensors get their clear error from the checks inside)
        with torch.cuda.device(z0.device):
            return _fused_rollout(w, z0, actions, goal, workspace=workspace, tiles=tiles)
    return _fused_rollout(w, z0, actions, goal, workspace=workspace, tiles=tiles)


def _fused_rollout(w: RolloutWeights, z0: torch.Tensor, actions: torch.Tensor, goal: torch.Tensor | None = None,
                   *, workspace: RolloutWorkspace | None = None, tiles: dict | None = None):
    """The fused Triton rollout (see the module docstring); the same contract as `rollout_reference`.

    z0 (N, C, D), actions (N, H, A) (floating; cast to float32 and made contiguous if needed), goal
    (E, D) or None with N % E == 0; all on the weights' device (CUDA, or CPU under TRITON_INTERPRET=1).
    Returns (preds (N, H - C + 1, D) float32, cost (N,) float32 or None). With a `workspace`, both are
    views into it, overwritten by the next call. `tiles` overrides tile sizes (BLOCK_M, BLOCK_N,
    BLOCK_K, num_warps) for tuning."""
    z0, actions, goal = _check_inputs(w, z0, actions, goal, need_kernel_device=True)
    N, C, D = z0.shape
    H = actions.shape[1]
    L, W = w.depth, w.history
    ws = workspace
    if ws is None or ws.key != (N, C, H, w.device, w.dtype):
        if ws is not None:
            raise ValueError(f"fused_rollout: workspace was built for (N, C, H, device, dtype) = {ws.key}, "
                             f"got {(N, C, H, w.device, w.dtype)}")
        ws = RolloutWorkspace(w, N, C, H)
    dot = _dot_mode(w)
    Ha, I3, Fm, P = w.act_w1.shape[1], 3 * w.inner, w.mlp, w.proj_hidden
    NH = N * H

    # 1) the modulation table of every action and layer: 3 GEMMs over all N*H actions
    _launch_matmul(actions, (w.action_width, 0), NH, 1, w.action_width, w.act_w1, Ha, w.act_b1,
                   ws.act_h, (Ha, 0), Ha, act=_ACT_SILU, dot=dot, tiles=tiles)
    _launch_matmul(ws.act_h, (Ha, 0), NH, 1, Ha, w.act_w2, D, w.act_b2,
                   ws.act_e, (D, 0), D, act=_ACT_SILU, dot=dot, tiles=tiles)  # SiLU(c): adaLN's input
    _launch_matmul(ws.act_e, (D, 0), NH, 1, D, w.mod_w, L * 6 * D, w.mod_b,
                   ws.mod, (L * 6 * D, 0), L * 6 * D, dot=dot, tiles=tiles)
    ws.z[:, :C].copy_(z0)

    s_x = (ws.x.stride(0), ws.x.stride(1))
    s_z = (ws.z.stride(0), ws.z.stride(1))
    s_m = (ws.mod.stride(0), ws.mod.stride(1))
    s_c = (ws.qkv.stride(1), ws.qkv.stride(2))
    s_h = (ws.hid.stride(0), ws.hid.stride(1))
    rows_per_goal = N // goal.shape[0] if goal is not None else 1
    steps = rollout_schedule(C, H, W)
    for i, lo, p0, T in steps:
        TN = T - p0
        for l in range(L):
            qkv_l = ws.qkv[l]
            # (1) [embed in layer 0] LN -> modulate -> LN -> qkv of the new tokens into the cache
            first = l == 0
            _launch_norm_matmul(
                ws.z[:, lo + p0] if first else ws.x[:, p0], s_z if first else s_x, N * TN, TN, D,
                w.attn_ln_w[l], w.attn_ln_b[l], w.qkv_w[l], I3, None, qkv_l[:, p0], s_c, I3, w.eps_attn,
                mod=ws.mod[:, lo + p0, l, 0], s_m=s_m, eps_mod=w.eps_mod,
                embed_pos=w.pos[p0] if first else None, x_out=ws.x[:, p0] if first else None, s_xo=s_x,
                dot=dot, tiles=tiles)
            q0 = T - 1 if l == L - 1 else p0  # last layer: only the last token's output matters
            TQ = T - q0
            # (2) attention over the window + out projection + gated residual
            _launch_attn_out(qkv_l, N, TQ, q0, T, w, l, ws.mod[:, lo + q0, l, 2], s_m, ws.x[:, q0], s_x,
                             dot, tiles)
            # (3) LN -> modulate -> LN -> fc1 + b -> GELU
            _launch_norm_matmul(
                ws.x[:, q0], s_x, N * TQ, TQ, D, w.mlp_ln_w[l], w.mlp_ln_b[l], w.fc1_w[l], Fm, w.fc1_b[l],
                ws.hid, s_h, Fm, w.eps_mlp, act=_ACT_GELU, mod=ws.mod[:, lo + q0, l, 3], s_m=s_m,
                eps_mod=w.eps_mod, dot=dot, tiles=tiles)
            # (4) fc2 + b, gated residual
            _launch_matmul(ws.hid, s_h, N * TQ, TQ, Fm, w.fc2_w[l], D, w.fc2_b[l], ws.x[:, q0], s_x, D,
                           epi=_EPI_RESIDUAL, gate=ws.mod[:, lo + q0, l, 5], s_g=s_m, dot=dot, tiles=tiles)
        # final LayerNorm -> pred_proj (BN folded) on the last token; on the last step, the cost
        _launch_norm_matmul(ws.x[:, T - 1], s_x, N, 1, D, w.norm_w, w.norm_b, w.head_w1, P, w.head_b1,
                            ws.phid, (P, 0), P, w.eps_out, act=_ACT_GELU, dot=dot, tiles=tiles)
        last = i == H - 1
        _launch_matmul(ws.phid, (P, 0), N, 1, P, w.head_w2, D, w.head_b2, ws.z[:, i + 1], s_z, D,
                       epi=_EPI_COST if (last and goal is not None) else _EPI_STORE,
                       goal=goal, cost=ws.cost, rows_per_goal=rows_per_goal, dot=dot, tiles=tiles)
    return ws.z[:, C:], (ws.cost if goal is not None else None)
