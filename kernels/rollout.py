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
  kernel and the CPU fast path of the planner (also what `torch.compile` compiles).
* `fused_rollout(w, z0, actions, goal)`: Triton, ONE kernel (`_rollout_kernel`) whose work is cut
  into items of five kinds. Rows are candidates in row blocks of BM (a wgmma-sized M tile of 64 on
  the GPU); the tokens of a candidate (<= W) are separate tiles of the same rows, so attention reads
  row-aligned tiles of the candidate's own KV-cache slots and is elementwise (no tl.dot for 3 keys). The phases, in order (`build_phases`):

    ACT   per (row block, action j): Conv1d(k=1) folded into Linear -> SiLU -> Linear -> SiLU, i.e.
          adaLN's input for every action (and the context latents copied into z)
    MOD   per (row block, action, column block): the adaLN table of every layer, (N, H, L*6*D),
          with 1 + scale stored; its last item builds the first step's input rows
    then per rollout step, per layer:
    ATT   per (row block, head group): q, k, v of the new tokens into the cache (bf16: one tile per
          head), causal attention of the query tokens (online softmax over <= W keys, once per
          head), the out projection of those heads
    MLP   per (row block, hidden block): fc1 + bias -> GELU -> fc2 of that hidden block; the hidden
          tile never leaves registers
    and per step:
    HEAD  per (row block, hidden block): pred_proj (eval BatchNorm folded into fc1) the same way; its
          epilogue writes z[i+1] (and the cost on the last step) and builds the next step's input
    RED   per (row block, a few rows): the epilogue of the phase before it (see below)

  A GEMM split over head groups or hidden blocks writes fp32 partial sums, added in a fixed order
  (deterministic results), then the epilogue runs once per row: the gated residual, then the next
  GEMM's input LN(no affine) -> modulate -> LN(affine) (or the final LayerNorm), stored in the
  weights' dtype. Two ways, by `RolloutConfig.red_rows`:
    0     the LAST item of a (phase, row block) to finish (an atomic arrival count) runs it for all
          BM rows, every LayerNorm in column chunks (no full row held in registers): fp32's way;
    > 0   a RED phase of its own follows each phase: items of red_rows (candidate, token) rows each,
          a row held whole in registers, the partial sums of several splits loaded at once. On one
          SM the fused epilogue is a chain of ~(splits + 6) dependent L2 round trips per column chunk
          and token, alone while the other SMs wait; RED items take a few each, side by side
          (bf16's way; bench/gpu_model.py models both). Splits are only used where row blocks are
          too few to fill the SMs (1 env: 300 candidates); at 50 envs nothing is split
          (`rollout_config`).

  Launch: persistent (the GPU default): a grid of one program per SM takes items in ticket order
  from an atomic counter; an item first waits (spinning on an acquire load) until its row block's
  earlier phases are done. It only ever waits for smaller tickets, held by programs that are already
  running, so it cannot deadlock whatever the number of resident programs. Or one launch per phase
  (`persistent=False`, each launch a kernel specialised to one item kind): the same items, with the
  launch order as the dependency. A rollout is 2 launches (the counters' reset + the kernel) instead
  of 3 + 1 + steps x (4 x depth + 2) = 134 for the previous four-kernels-per-layer design.

  GEMMs use tl.dot with fp32 accumulation and an explicit out_dtype; weights, GEMM inputs and the
  KV cache in the weights' dtype (bfloat16: tensor cores, wgmma on Hopper; float32: exact
  input_precision="ieee" FMA dots, with narrower K / hidden / output blocks so nothing spills); the
  residual stream, LayerNorm statistics, softmax, the modulation table, partial sums and latents in
  float32. Loads of data written by other programs bypass L1 (".cg").

Weights come packed as a `RolloutWeights` (stacked per-layer tensors; GEMM weights stored (in, out)
so tiles load along rows). This package never imports `lewm`: `lewm.plan.engine.pack_predictor` turns
a model into one.

Runs on triton 3.6 (GPU machines) and the registry's triton, and under TRITON_INTERPRET=1 on CPU
tensors (there the persistent kernel's first program takes every ticket, so dependencies are always
met): plain pointer arithmetic, int32 offsets (buffers are checked to stay below 2**31 elements), no
tl.make_block_ptr, no autotuning (the decomposition comes from `rollout_config`). All tile dims are
>= 16 (asserted: the interpreter does not check tl.dot's minimum), so model dims below 16 (the action
width, 10) are handled by masked, zero-padded tiles. In the interpreter, bf16 dots are computed in
fp32 (its native bf16 dot is wrong, triton issue #11584).

Everything the rollout launches depends only on Python ints derived from shapes: no host
synchronisation, so it can be captured in a CUDA graph.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import _utils

__all__ = [
    "RolloutWeights",
    "RolloutWorkspace",
    "RolloutConfig",
    "rollout_config",
    "build_phases",
    "phase_costs",
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
    """True when the kernel below was built by the Triton interpreter (TRITON_INTERPRET=1 set before
    this module was imported): then it runs on CPU tensors."""
    return _utils.interpreted(_rollout_kernel)


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
# Triton: one kernel, five kinds of work item
# ----------------------------------------------------------------------------------------------------

# Work-item kinds (column 0 of the phase table).
_ACT, _MOD, _ATT, _MLP, _HEAD, _RED = 0, 1, 2, 3, 4, 5
_PHASE_NAMES = {_ACT: "action-encoder", _MOD: "modulation", _ATT: "attention", _MLP: "mlp", _HEAD: "pred_proj",
                _RED: "reduce"}
_PT_COLS = 16  # ints per phase-table row

# Phase-table columns.
_C_TYPE, _C_START, _C_ITEMS, _C_SPLIT, _C_I, _C_LO, _C_P0, _C_T, _C_Q0, _C_L, _C_LAST, _C_NLO, _C_NP0, _C_NT, \
    _C_AUX, _C_GSPLIT = range(16)  # AUX: a GEMM/MOD phase's 'RED follows' flag, a RED phase's GEMM kind;
# GSPLIT: a RED phase's partial sums per row, an MLP phase's hidden splits when its tokens are items (else 0)


@triton.jit
def _dot(a, b, DOT: tl.constexpr):
    """a (BM, BK) @ b (BK, BN) -> float32, by DOT mode (see _DOT_*); fp32 accumulation always."""
    if DOT == 0:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee", out_dtype=tl.float32)
    elif DOT == 1:
        r = tl.dot(a.to(b.dtype), b, out_dtype=tl.float32)
    else:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee", out_dtype=tl.float32)
    return r


@triton.jit
def _act(x, ACT: tl.constexpr):
    if ACT == 1:  # SiLU
        x = x / (1.0 + tl.exp(-x))
    elif ACT == 2:  # exact (erf) GELU, as nn.GELU()
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    return x


@triton.jit
def _ln(x, dmask, D, eps):
    """Row LayerNorm without affine of x (BM, BD) whose padded columns are 0; padded columns stay 0."""
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(dmask[None, :], x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / D
    return xc * (1.0 / tl.sqrt(var + eps))[:, None]


@triton.jit
def _mlp_tile(arow, amask, K, w1_ptr, s_w1, b1_ptr, f_lo, f_hi, w2_ptr, D, d, dmask,
              ACT: tl.constexpr, DOT: tl.constexpr,
              BM: tl.constexpr, BK: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr):
    """sum over hidden f in [f_lo, f_hi) of act(A @ W1[:, f] + b1[f]) @ W2[f, :] -> (BM, BD) float32.
    A rows at arow (BM,) pointers, K values each; W1 (K, *) with row stride s_w1; W2 (*, D).
    The hidden tile (BM, BF) never leaves registers."""
    kk = tl.arange(0, BK)
    acc = tl.zeros((BM, BD), dtype=tl.float32)
    for f0 in range(f_lo, f_hi, BF):
        f = f0 + tl.arange(0, BF)
        fm = f < f_hi
        hid = tl.zeros((BM, BF), dtype=tl.float32)
        for k0 in range(0, K, BK):
            km = (k0 + kk) < K
            a = tl.load(arow[:, None] + k0 + kk[None, :], mask=amask[:, None] & km[None, :], other=0.0,
                        cache_modifier=".cg")
            wt = tl.load(w1_ptr + (k0 + kk)[:, None] * s_w1 + f[None, :], mask=km[:, None] & fm[None, :], other=0.0)
            hid += _dot(a, wt, DOT)
        hid = _act(hid + tl.load(b1_ptr + f, mask=fm, other=0.0)[None, :], ACT)
        w2 = tl.load(w2_ptr + f[:, None] * D + d[None, :], mask=fm[:, None] & dmask[None, :], other=0.0)
        acc += _dot(hid, w2, DOT)
    return acc


@triton.jit
def _row_stats(row, nmask, D, mean, BM: tl.constexpr, BC: tl.constexpr):
    """rstd = 1 / sqrt(var + 0) pieces: sum over the row of (v - mean)^2, in column chunks."""
    c = tl.arange(0, BC)
    acc = tl.zeros((BM,), dtype=tl.float32)
    for c0 in range(0, D, BC):
        cm = nmask[:, None] & ((c0 + c) < D)[None, :]
        v = tl.load(row[:, None] + c0 + c[None, :], mask=cm, other=0.0, cache_modifier=".cg")
        dv = tl.where(cm, v - mean[:, None], 0.0)
        acc += tl.sum(dv * dv, axis=1)
    return acc / D


@triton.jit
def _normalize_rows(xrow, nmask, D, mrow, tmprow, lnw_ptr, lnb_ptr, hrow, eps_mod, eps_ln,
                    MODULATE: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr):
    """h = LN_affine(LN(x) * (1 + scale) + shift) (MODULATE) or LN_affine(x), for rows xrow (BM,)
    of D floats, in column chunks of BC (no full row is ever held in registers). mrow points at each
    row's (shift, scale) pair in the modulation table (scale holds 1 + scale); tmprow is fp32 scratch
    for the modulated rows. Two-pass (centred) variances, as F.layer_norm."""
    c = tl.arange(0, BC)
    s1 = tl.zeros((BM,), dtype=tl.float32)
    for c0 in range(0, D, BC):
        cm = nmask[:, None] & ((c0 + c) < D)[None, :]
        s1 += tl.sum(tl.load(xrow[:, None] + c0 + c[None, :], mask=cm, other=0.0, cache_modifier=".cg"), axis=1)
    mean = s1 / D
    rstd = 1.0 / tl.sqrt(_row_stats(xrow, nmask, D, mean, BM, BC) + (eps_mod if MODULATE else eps_ln))
    src = xrow
    if MODULATE:
        s1 = tl.zeros((BM,), dtype=tl.float32)
        for c0 in range(0, D, BC):
            cm = nmask[:, None] & ((c0 + c) < D)[None, :]
            x = tl.load(xrow[:, None] + c0 + c[None, :], mask=cm, other=0.0, cache_modifier=".cg")
            shift = tl.load(mrow[:, None] + c0 + c[None, :], mask=cm, other=0.0, cache_modifier=".cg")
            scale = tl.load(mrow[:, None] + D + c0 + c[None, :], mask=cm, other=0.0, cache_modifier=".cg")
            y = tl.where(cm, (x - mean[:, None]) * rstd[:, None] * scale + shift, 0.0)
            tl.store(tmprow[:, None] + c0 + c[None, :], y, mask=cm)
            s1 += tl.sum(y, axis=1)
        tl.debug_barrier()
        mean = s1 / D
        rstd = 1.0 / tl.sqrt(_row_stats(tmprow, nmask, D, mean, BM, BC) + eps_ln)
        src = tmprow
    for c0 in range(0, D, BC):
        cmk = (c0 + c) < D
        cm = nmask[:, None] & cmk[None, :]
        v = tl.load(src[:, None] + c0 + c[None, :], mask=cm, other=0.0, cache_modifier=".cg")
        g = tl.load(lnw_ptr + c0 + c, mask=cmk, other=0.0)
        b = tl.load(lnb_ptr + c0 + c, mask=cmk, other=0.0)
        h = (v - mean[:, None]) * rstd[:, None] * g[None, :] + b[None, :]
        tl.store(hrow[:, None] + c0 + c[None, :], h.to(hrow.dtype.element_ty), mask=cm)
    tl.debug_barrier()


@triton.jit
def _split_sum(prow, pstride, nsplit, c0, c, cm, BM: tl.constexpr, BC: tl.constexpr):
    """sum over splits g = 0 .. nsplit-1, in that order, of the partial-sum columns c0 + c of rows prow."""
    s = tl.zeros((BM, BC), dtype=tl.float32)
    for g in range(0, nsplit):
        s += tl.load(prow[:, None] + g * pstride + c0 + c[None, :], mask=cm, other=0.0, cache_modifier=".cg")
    return s


@triton.jit
def _finish(typ, tq, nsplit, n64, nmask, l, lo, i, last_step,
            x_ptr, h_ptr, z_ptr, mod_ptr, part_ptr, cost_ptr, goal_ptr,
            out_b, fc2_b, head_b2, attn_ln_w, attn_ln_b, mlp_ln_w, mlp_ln_b, norm_w, norm_b,
            N, H, D, L, W, rows_per_goal, eps_mod, eps_attn, eps_mlp, eps_out,
            HAS_GOAL: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr):
    """What follows a GEMM whose partial sums (nsplit of them, in part[g, n, tq]) are all written, for
    token tq: ATT: x += gate_a * (sum + b_out), then the MLP branch input; MLP: x += gate_m * (sum + b),
    then the next layer's attention input, or in the last layer the final LayerNorm; HEAD:
    z[i+1] = sum + b, and on the last step the cost ||z - goal||^2. The splits are summed in a fixed
    order (deterministic); everything runs in column chunks of BC."""
    c = tl.arange(0, BC)
    L6D = L * 6 * D
    mrow = mod_ptr + (n64 * H + lo + tq) * L6D + l * 6 * D  # this token's layer-l modulation
    xrow = x_ptr + (n64 * W + tq) * D
    hrow = h_ptr + (n64 * W + tq) * D
    prow = part_ptr + (n64 * W + tq) * D  # split g at + g * N * W * D
    pstride = N * W * D
    if typ == 4:
        zrow = z_ptr + (n64 * (H + 1) + i + 1) * D
        cost = tl.zeros((BM,), dtype=tl.float32)
        for c0 in range(0, D, BC):
            cmk = (c0 + c) < D
            cm = nmask[:, None] & cmk[None, :]
            s = _split_sum(prow, pstride, nsplit, c0, c, cm, BM, BC)
            zn = s + tl.load(head_b2 + c0 + c, mask=cmk, other=0.0)[None, :]
            tl.store(zrow[:, None] + c0 + c[None, :], zn, mask=cm)
            if HAS_GOAL:
                gl = tl.load(goal_ptr + (n64 // rows_per_goal)[:, None] * D + c0 + c[None, :], mask=cm, other=0.0)
                dz = tl.where(cm, zn - gl, 0.0)
                cost += tl.sum(dz * dz, axis=1)
        if HAS_GOAL:
            if last_step != 0:
                tl.store(cost_ptr + n64, cost, mask=nmask)
        tl.debug_barrier()
    else:
        gate_off = 2 * D if typ == 2 else 5 * D
        bias = out_b + l * D if typ == 2 else fc2_b + l * D
        for c0 in range(0, D, BC):
            cmk = (c0 + c) < D
            cm = nmask[:, None] & cmk[None, :]
            s = _split_sum(prow, pstride, nsplit, c0, c, cm, BM, BC)
            gate = tl.load(mrow[:, None] + gate_off + c0 + c[None, :], mask=cm, other=0.0, cache_modifier=".cg")
            x = tl.load(xrow[:, None] + c0 + c[None, :], mask=cm, other=0.0, cache_modifier=".cg")
            x += gate * (s + tl.load(bias + c0 + c, mask=cmk, other=0.0)[None, :])
            tl.store(xrow[:, None] + c0 + c[None, :], x, mask=cm)
        tl.debug_barrier()
        if typ == 2:
            _normalize_rows(xrow, nmask, D, mrow + 3 * D, prow, mlp_ln_w + l * D, mlp_ln_b + l * D, hrow,
                            eps_mod, eps_mlp, True, BM, BC)
        elif l + 1 < L:
            _normalize_rows(xrow, nmask, D, mrow + 6 * D, prow, attn_ln_w + (l + 1) * D, attn_ln_b + (l + 1) * D,
                            hrow, eps_mod, eps_attn, True, BM, BC)
        else:  # the predictor's final LayerNorm: pred_proj's input
            _normalize_rows(xrow, nmask, D, mrow, prow, norm_w, norm_b, hrow, eps_mod, eps_out, False, BM, BC)


@triton.jit
def _prep_step(n64, nmask, nlo, np0, nT, x_ptr, h_ptr, z_ptr, mod_ptr, part_ptr, pos_ptr, attn_ln_w, attn_ln_b,
               N, H, D, L, W, eps_mod, eps_attn, BM: tl.constexpr, BC: tl.constexpr):
    """The next step's input: for its new tokens t, x = z[frame nlo + t] + pos[t], and the layer-0
    attention input LN_affine(LN(x) * (1 + scale) + shift)."""
    c = tl.arange(0, BC)
    L6D = L * 6 * D
    for t in range(np0, nT):
        xrow = x_ptr + (n64 * W + t) * D
        zrow = z_ptr + (n64 * (H + 1) + nlo + t) * D
        for c0 in range(0, D, BC):
            cmk = (c0 + c) < D
            cm = nmask[:, None] & cmk[None, :]
            zt = tl.load(zrow[:, None] + c0 + c[None, :], mask=cm, other=0.0, cache_modifier=".cg")
            x = zt + tl.load(pos_ptr + t * D + c0 + c, mask=cmk, other=0.0)[None, :]
            tl.store(xrow[:, None] + c0 + c[None, :], x, mask=cm)
        tl.debug_barrier()
        _normalize_rows(xrow, nmask, D, mod_ptr + (n64 * H + nlo + t) * L6D, part_ptr + (n64 * W + t) * D,
                        attn_ln_w, attn_ln_b, h_ptr + (n64 * W + t) * D, eps_mod, eps_attn, True, BM, BC)


@triton.jit
def _input_rows(xv, m2, d, dmask, mrow, lnw_ptr, lnb_ptr, hrow, D, eps_mod, eps_ln, MODULATE: tl.constexpr):
    """The next GEMM's input rows from register-resident residual rows xv (R, BD): h =
    LN_affine(LN(x) * (1 + scale) + shift) (MODULATE; mrow (R,) points at each row's shift, scale)
    or LN_affine(x), stored at hrow (R,) in h's dtype."""
    if MODULATE:
        shift = tl.load(mrow[:, None] + d[None, :], mask=m2, other=0.0, cache_modifier=".cg")
        scale = tl.load(mrow[:, None] + D + d[None, :], mask=m2, other=0.0, cache_modifier=".cg")
        xv = tl.where(m2, _ln(xv, dmask, D, eps_mod) * scale + shift, 0.0)
    g = tl.load(lnw_ptr + d, mask=dmask, other=0.0)
    b = tl.load(lnb_ptr + d, mask=dmask, other=0.0)
    h = _ln(xv, dmask, D, eps_ln) * g[None, :] + b[None, :]
    tl.store(hrow[:, None] + d[None, :], h.to(hrow.dtype.element_ty), mask=m2)


@triton.jit
def _prep_rows(n, rmask, nlo, np0, nT, x_ptr, h_ptr, z_ptr, mod_ptr, pos_ptr, attn_ln_w, attn_ln_b,
               H, D, L, W, eps_mod, eps_attn, BD: tl.constexpr):
    """_prep_step for the candidate rows n (R,), each row held whole in registers."""
    d = tl.arange(0, BD)
    dmask = d < D
    m2 = rmask[:, None] & dmask[None, :]
    L6D = L * 6 * D
    for t in range(np0, nT):
        zt = tl.load(z_ptr + (n * (H + 1) + nlo + t)[:, None] * D + d[None, :], mask=m2, other=0.0,
                     cache_modifier=".cg")
        xv = zt + tl.load(pos_ptr + t * D + d, mask=dmask, other=0.0)[None, :]
        tl.store(x_ptr + (n * W + t)[:, None] * D + d[None, :], xv, mask=m2)
        _input_rows(xv, m2, d, dmask, mod_ptr + (n * H + nlo + t) * L6D, attn_ln_w, attn_ln_b,
                    h_ptr + (n * W + t) * D, D, eps_mod, eps_attn, True)


@triton.jit
def _reduce_rows(of, nsplit, rb, sp, nt, q0, l, lo, i, last_step, nlo, np0, nT,
                 x_ptr, h_ptr, z_ptr, mod_ptr, part_ptr, cost_ptr, goal_ptr, pos_ptr,
                 out_b, fc2_b, head_b2, attn_ln_w, attn_ln_b, mlp_ln_w, mlp_ln_b, norm_w, norm_b,
                 N, H, D, L, W, rows_per_goal, eps_mod, eps_attn, eps_mlp, eps_out,
                 HAS_GOAL: tl.constexpr, BM: tl.constexpr, RR: tl.constexpr, BD: tl.constexpr,
                 MAXS: tl.constexpr):
    """A RED item: the epilogue of GEMM phase `of` (what _finish / _prep_step do for a whole row
    block) for RR of the row block's (candidate, token) rows, numbered candidate-major with nt tokens
    q0 .. q0 + nt - 1 per candidate (nt = 1 after pred_proj and the modulation table). Each row is held
    whole in registers, the nsplit partial sums are loaded MAXS at a time (an unrolled group of masked
    loads in flight together) and added in split order, as _split_sum does: deterministic."""
    d = tl.arange(0, BD)
    dmask = d < D
    r = sp * RR + tl.arange(0, RR)
    c = r // nt
    n = rb * BM + c
    tok = q0 + r % nt
    rmask = (c < BM) & (n < N)
    m2 = rmask[:, None] & dmask[None, :]
    L6D = L * 6 * D
    if of >= 2:
        prow = part_ptr + (n * W + tok) * D
        pstride = N * W * D
        s = tl.zeros((RR, BD), dtype=tl.float32)
        for g0 in range(0, nsplit, MAXS):  # MAXS loads at once (unrolled), added in split order
            for g in tl.static_range(MAXS):
                s += tl.load(prow[:, None] + (g0 + g) * pstride + d[None, :], mask=m2 & (g0 + g < nsplit),
                             other=0.0, cache_modifier=".cg")
        if of == 4:  # pred_proj: the next latent, the cost, the next step's input rows
            zn = s + tl.load(head_b2 + d, mask=dmask, other=0.0)[None, :]
            tl.store(z_ptr + (n * (H + 1) + i + 1)[:, None] * D + d[None, :], zn, mask=m2)
            if HAS_GOAL:
                if last_step != 0:
                    gl = tl.load(goal_ptr + (n // rows_per_goal)[:, None] * D + d[None, :], mask=m2, other=0.0)
                    dz = tl.where(m2, zn - gl, 0.0)
                    tl.store(cost_ptr + n, tl.sum(dz * dz, axis=1), mask=rmask)
            if last_step == 0:
                tl.debug_barrier()
                _prep_rows(n, rmask, nlo, np0, nT, x_ptr, h_ptr, z_ptr, mod_ptr, pos_ptr, attn_ln_w, attn_ln_b,
                           H, D, L, W, eps_mod, eps_attn, BD)
        else:  # attention / MLP: the gated residual, then the next GEMM's input rows
            mrow = mod_ptr + (n * H + lo + tok) * L6D + l * 6 * D
            xrow = x_ptr + (n * W + tok) * D
            gate_off = 2 * D if of == 2 else 5 * D
            bias = out_b + l * D if of == 2 else fc2_b + l * D
            gate = tl.load(mrow[:, None] + gate_off + d[None, :], mask=m2, other=0.0, cache_modifier=".cg")
            xv = tl.load(xrow[:, None] + d[None, :], mask=m2, other=0.0, cache_modifier=".cg")
            xv += gate * (s + tl.load(bias + d, mask=dmask, other=0.0)[None, :])
            tl.store(xrow[:, None] + d[None, :], xv, mask=m2)
            hrow = h_ptr + (n * W + tok) * D
            if of == 2:
                _input_rows(xv, m2, d, dmask, mrow + 3 * D, mlp_ln_w + l * D, mlp_ln_b + l * D, hrow, D,
                            eps_mod, eps_mlp, True)
            elif l + 1 < L:
                _input_rows(xv, m2, d, dmask, mrow + 6 * D, attn_ln_w + (l + 1) * D, attn_ln_b + (l + 1) * D,
                            hrow, D, eps_mod, eps_attn, True)
            else:  # the predictor's final LayerNorm: pred_proj's input
                _input_rows(xv, m2, d, dmask, mrow, norm_w, norm_b, hrow, D, eps_mod, eps_out, False)
    else:  # after the modulation table: the first step's input rows
        _prep_rows(n, rmask, nlo, np0, nT, x_ptr, h_ptr, z_ptr, mod_ptr, pos_ptr, attn_ln_w, attn_ln_b,
                   H, D, L, W, eps_mod, eps_attn, BD)


@triton.jit
def _rollout_kernel(
    ptab_ptr, ph_first, total, ctr_ptr, RB,  # phase table, first phase, ticket count, counters, row blocks
    act_ptr, z0_ptr, goal_ptr,  # inputs: actions (N, H, A) f32, context (N, C, D) f32, goals (E, D) f32
    z_ptr, x_ptr, h_ptr, kv_ptr, mod_ptr, se_ptr, part_ptr, cost_ptr,  # workspace (see RolloutWorkspace)
    pos_ptr, act_w1, act_b1, act_w2, act_b2, mod_w, mod_b, attn_ln_w, attn_ln_b, qkv_w, out_w, out_b,
    mlp_ln_w, mlp_ln_b, fc1_w, fc1_b, fc2_w, fc2_b, norm_w, norm_b, head_w1, head_b1, head_w2, head_b2,
    N, C, H, A, D, L, HEADS, DH, FF, P, HA, W, rows_per_goal, HPG, FCW, PCW, TCW, NCH,
    eps_mod, eps_attn, eps_mlp, eps_out, sm_scale,
    PERSISTENT: tl.constexpr, HAS_GOAL: tl.constexpr, DOT: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr, BDH: tl.constexpr,
    BC: tl.constexpr, BE: tl.constexpr, BN: tl.constexpr, KIND: tl.constexpr, RR: tl.constexpr,
    MAXS: tl.constexpr, QKV: tl.constexpr,
):
    """The whole rollout as work items (see the module docstring). Ticket t names one item: its phase
    (a row of the phase table), its row block rb (BM candidates) and its split sp. PERSISTENT: programs
    take tickets in order from an atomic counter and an item first waits until the phases before it are
    done for its row block (an item only ever waits for smaller tickets, which running programs hold, so
    this cannot deadlock, whatever the number of resident programs). Otherwise one launch per phase,
    one item per program. The last item of a (phase, row block) to finish reduces the splits' partial
    sums in a fixed order (deterministic), applies the epilogue and marks the phase done."""
    I3 = 3 * HEADS * DH
    INNER = HEADS * DH
    L6D = L * 6 * D
    done_ptr = ctr_ptr + 1
    arrive_ptr = ctr_ptr + 1 + RB

    if PERSISTENT:
        tk = tl.atomic_add(ctr_ptr, 1)
    else:
        tk = tl.load(ptab_ptr + ph_first * 16 + 1) + tl.program_id(0)
    ph = ph_first
    while tk < total:
        while tk >= tl.load(ptab_ptr + ph * 16 + 1) + tl.load(ptab_ptr + ph * 16 + 2):
            ph += 1
        row = ptab_ptr + ph * 16
        if KIND == -1:  # the persistent kernel serves every kind of item
            typ = tl.load(row + 0)
        else:  # a kernel specialised to one kind (one launch per phase)
            typ = KIND
        nsplit = tl.load(row + 3)
        i = tl.load(row + 4)
        lo = tl.load(row + 5)
        p0 = tl.load(row + 6)
        T = tl.load(row + 7)
        q0 = tl.load(row + 8)
        l = tl.load(row + 9)
        last_step = tl.load(row + 10)
        col14 = tl.load(row + 14)  # GEMM / MOD phases: 1 = their epilogue is a RED phase; RED: its GEMM's kind
        item = tk - tl.load(row + 1)
        rb = item // nsplit
        sp = item % nsplit
        n = rb * BM + tl.arange(0, BM)
        nmask = n < N
        n64 = n  # int32 offsets (every buffer is checked to hold < 2**31 elements)
        if PERSISTENT:  # the phases before this one, for this row block
            while tl.atomic_add(done_ptr + rb, 0, sem="acquire") < ph:
                pass
            tl.debug_barrier()

        # (index vectors made where they are used, not once for the whole loop: fewer live registers)
        if typ == 0:  # ACT (split = action j): SiLU(ActionEncoder(a_j)), adaLN's input; context copy
            d = tl.arange(0, BD)
            dmask = d < D
            m2 = nmask[:, None] & dmask[None, :]
            j = sp
            y = _mlp_tile(act_ptr + (n64 * H + j) * A, nmask, A, act_w1, HA, act_b1, 0, HA, act_w2, D, d, dmask,
                          1, DOT, BM, BK, BF, BD)
            y = _act(y + tl.load(act_b2 + d, mask=dmask, other=0.0)[None, :], 1)
            tl.store(se_ptr + (n64 * H + j)[:, None] * D + d[None, :], y.to(se_ptr.dtype.element_ty), mask=m2)
            if j < C:
                zc = tl.load(z0_ptr + (n64 * C + j)[:, None] * D + d[None, :], mask=m2, other=0.0)
                tl.store(z_ptr + (n64 * (H + 1) + j)[:, None] * D + d[None, :], zc, mask=m2)
        elif typ == 1:  # MOD (split = (action j, column block c)): the adaLN table, with 1 + scale
            d = tl.arange(0, BD)
            kk = tl.arange(0, BK)
            j = sp // NCH
            cols = (sp % NCH) * BD + d
            cmask = cols < L6D
            arow = se_ptr + (n64 * H + j) * D
            acc = tl.zeros((BM, BD), dtype=tl.float32)
            for k0 in range(0, D, BK):
                km = (k0 + kk) < D
                a = tl.load(arow[:, None] + k0 + kk[None, :], mask=nmask[:, None] & km[None, :], other=0.0,
                            cache_modifier=".cg")
                wt = tl.load(mod_w + (k0 + kk)[:, None] * L6D + cols[None, :], mask=km[:, None] & cmask[None, :],
                             other=0.0)
                acc += _dot(a, wt, DOT)
            acc += tl.load(mod_b + cols, mask=cmask, other=0.0)[None, :]
            part = (cols // D) % 6
            acc += tl.where((part == 1) | (part == 4), 1.0, 0.0)[None, :]
            tl.store(mod_ptr + (n64 * H + j)[:, None] * L6D + cols[None, :], acc,
                     mask=nmask[:, None] & cmask[None, :])
        elif typ == 2:  # ATT (split = a group of HPG heads)
            e = tl.arange(0, BDH)
            emask = e < DH
            kk = tl.arange(0, BK)
            kvrow = kv_ptr + ((l * N + n64) * W) * I3  # (BM,) this layer's cache of each candidate
            me = nmask[:, None] & emask[None, :]
            # q, k, v of the new tokens, for this group's heads, into the cache
            for t in range(p0, T):
                hrow = h_ptr + (n64 * W + t) * D
                for hd in range(sp * HPG, sp * HPG + HPG):
                    # QKV: q, k and v in one (BM, 4 BDH) tile (one K loop; bf16 wgmma); else one at a time
                    # (one accumulator live: fp32 FMA dots)
                    for c3 in range(0, 1 if QKV else 3):
                        if QKV:
                            jq = tl.arange(0, 4 * BDH)
                            qcol = (jq // BDH) * INNER + hd * DH + jq % BDH
                            qm = ((jq // BDH) < 3) & ((jq % BDH) < DH)
                        else:
                            jq = tl.arange(0, BDH)
                            qcol = c3 * INNER + hd * DH + jq
                            qm = jq < DH
                        acc3 = tl.zeros((BM, 4 * BDH if QKV else BDH), dtype=tl.float32)
                        for k0 in range(0, D, BK):
                            km = (k0 + kk) < D
                            a = tl.load(hrow[:, None] + k0 + kk[None, :], mask=nmask[:, None] & km[None, :],
                                        other=0.0, cache_modifier=".cg")
                            wt = tl.load(qkv_w + l * D * I3 + (k0 + kk)[:, None] * I3 + qcol[None, :],
                                         mask=km[:, None] & qm[None, :], other=0.0)
                            acc3 += _dot(a, wt, DOT)
                        tl.store(kvrow[:, None] + t * I3 + qcol[None, :], acc3.to(kv_ptr.dtype.element_ty),
                                 mask=nmask[:, None] & qm[None, :])
            tl.debug_barrier()
            # causal attention of each query token (online softmax over <= W keys), once per head and
            # BE-wide block of its output, then the out projection of that block: BN >= BD, into one
            # register accumulator of the whole output width, stored once; else into every BN-wide block
            # of the partial sums (added to what the previous blocks left there). Either way the same
            # order of sums over heads and blocks, so deterministic
            for tq in range(q0, T):
                prow = part_ptr + ((sp * N + n64) * W + tq) * D
                if BN >= BD:  # the out projection's whole output width in registers across heads
                    dw = tl.arange(0, BD)
                    oacc = tl.zeros((BM, BD), dtype=tl.float32)
                for hd in range(sp * HPG, sp * HPG + HPG):
                    hb = kvrow[:, None] + hd * DH + e[None, :]
                    for e0 in range(0, DH, BE):  # the head's output in BE-wide column blocks
                        ec = e0 + tl.arange(0, BE)
                        mc = nmask[:, None] & (ec < DH)[None, :]
                        vb = kvrow[:, None] + 2 * INNER + hd * DH + ec[None, :]
                        q = tl.load(hb + tq * I3, mask=me, other=0.0, cache_modifier=".cg").to(tl.float32) * sm_scale
                        kj = tl.load(hb + INNER, mask=me, other=0.0, cache_modifier=".cg").to(tl.float32)
                        o = tl.load(vb, mask=mc, other=0.0, cache_modifier=".cg").to(tl.float32)
                        m_i = tl.sum(q * kj, axis=1)  # key 0 is visible to every query
                        l_i = tl.full((BM,), 1.0, tl.float32)
                        for j in range(1, tq + 1):
                            kj = tl.load(hb + j * I3 + INNER, mask=me, other=0.0, cache_modifier=".cg").to(tl.float32)
                            vj = tl.load(vb + j * I3, mask=mc, other=0.0, cache_modifier=".cg").to(tl.float32)
                            sc = tl.sum(q * kj, axis=1)
                            m_new = tl.maximum(m_i, sc)
                            alpha = tl.exp(m_i - m_new)
                            pj = tl.exp(sc - m_new)
                            l_i = l_i * alpha + pj
                            o = o * alpha[:, None] + pj[:, None] * vj
                            m_i = m_new
                        o = o / l_i[:, None]
                        if BN >= BD:
                            wt = tl.load(out_w + l * INNER * D + (hd * DH + ec)[:, None] * D + dw[None, :],
                                         mask=(ec < DH)[:, None] & (dw < D)[None, :], other=0.0)
                            oacc += _dot(o, wt, DOT)
                        else:
                            first = (hd == sp * HPG) & (e0 == 0)
                            for c0 in range(0, D, BN):
                                dn = c0 + tl.arange(0, BN)
                                dnm = dn < D
                                pm = nmask[:, None] & dnm[None, :]
                                wt = tl.load(out_w + l * INNER * D + (hd * DH + ec)[:, None] * D + dn[None, :],
                                             mask=(ec < DH)[:, None] & dnm[None, :], other=0.0)
                                acc = tl.load(prow[:, None] + dn[None, :], mask=pm & (first == 0), other=0.0,
                                              cache_modifier=".cg")
                                acc += _dot(o, wt, DOT)
                                tl.store(prow[:, None] + dn[None, :], acc, mask=pm)
                if BN >= BD:
                    tl.store(prow[:, None] + dw[None, :], oacc, mask=nmask[:, None] & (dw < D)[None, :])
        elif typ == 5:  # RED (split = RR rows): the epilogue of the GEMM phase before it, for RR rows
            if RR > 0:  # (RR = 0: no RED phases, none of this code compiled)
                _reduce_rows(col14, tl.load(row + 15), rb, sp, T - q0, q0, l, lo, i, last_step, tl.load(row + 11),
                             tl.load(row + 12), tl.load(row + 13), x_ptr, h_ptr, z_ptr, mod_ptr, part_ptr, cost_ptr,
                             goal_ptr, pos_ptr, out_b, fc2_b, head_b2, attn_ln_w, attn_ln_b, mlp_ln_w, mlp_ln_b,
                             norm_w, norm_b, N, H, D, L, W, rows_per_goal, eps_mod, eps_attn, eps_mlp, eps_out,
                             HAS_GOAL, BM, RR, BD, MAXS)
        else:  # MLP (split = a hidden block of fc1) or HEAD (split = a hidden block of pred_proj)
            d = tl.arange(0, BD)
            dmask = d < D
            m2 = nmask[:, None] & dmask[None, :]
            # an MLP phase with tokens as items (column 15 = its hidden splits gs > 0): item sp is hidden
            # block sp % gs of token q0 + sp // gs; else every query token of the row block in turn
            gs = tl.load(row + 15)
            t_lo = q0
            t_hi = T
            sph = sp
            if gs > 0:
                t_lo = q0 + sp // gs
                t_hi = t_lo + 1
                sph = sp % gs
            fw = FCW if typ == 3 else PCW
            if RR > 0:  # (tokens as items only with RED phases: none of this in the per-kind kernels)
                if gs > 0:
                    fw = TCW  # tokens as items: their own hidden block width (cfg.token_splits)
            f_lo = sph * fw
            if typ == 3:
                w1p, s_w1, b1p, w2p = fc1_w + l * D * FF, FF, fc1_b + l * FF, fc2_w + l * FF * D
                f_hi = tl.minimum(f_lo + fw, FF)
            else:
                w1p, s_w1, b1p, w2p = head_w1, P, head_b1, head_w2
                f_hi = tl.minimum(f_lo + fw, P)
            for tq in range(t_lo, t_hi):  # one call site for both kinds (one copy of the code)
                acc = _mlp_tile(h_ptr + (n64 * W + tq) * D, nmask, D, w1p, s_w1, b1p, f_lo, f_hi, w2p, D, d, dmask, 2,
                                DOT, BM, BK, BF, BD)
                tl.store(part_ptr + ((sph * N + n64) * W + tq)[:, None] * D + d[None, :], acc, mask=m2)

        # arrival; the last item of this (phase, row block) reduces, finishes and marks it done
        tl.debug_barrier()
        old = tl.atomic_add(arrive_ptr + rb, 1, sem="acq_rel")
        if old == nsplit - 1:
            tl.atomic_xchg(arrive_ptr + rb, 0)
            tl.debug_barrier()
            if RR == 0:  # the epilogue here, by this last item (RR > 0: RED phases do it; not compiled)
                if (typ >= 2) & (typ <= 4) & (col14 == 0):
                    for tq in range(q0, T):
                        _finish(typ, tq, nsplit, n64, nmask, l, lo, i, last_step, x_ptr, h_ptr, z_ptr, mod_ptr, part_ptr,
                                cost_ptr, goal_ptr, out_b, fc2_b, head_b2, attn_ln_w, attn_ln_b, mlp_ln_w, mlp_ln_b,
                                norm_w, norm_b, N, H, D, L, W, rows_per_goal, eps_mod, eps_attn, eps_mlp, eps_out,
                                HAS_GOAL, BM, BC)
                if (typ == 1) & (col14 == 0):  # the first step's input rows
                    _prep_step(n64, nmask, tl.load(row + 11), tl.load(row + 12), tl.load(row + 13), x_ptr, h_ptr, z_ptr,
                               mod_ptr, part_ptr, pos_ptr, attn_ln_w, attn_ln_b, N, H, D, L, W, eps_mod, eps_attn, BM, BC)
                elif (typ == 4) & (col14 == 0):  # the next step's input rows
                    if last_step == 0:
                        _prep_step(n64, nmask, tl.load(row + 11), tl.load(row + 12), tl.load(row + 13), x_ptr, h_ptr,
                                   z_ptr, mod_ptr, part_ptr, pos_ptr, attn_ln_w, attn_ln_b, N, H, D, L, W, eps_mod,
                                   eps_attn, BM, BC)
            tl.debug_barrier()
            tl.atomic_add(done_ptr + rb, 1, sem="release")
        if PERSISTENT:
            tk = tl.atomic_add(ctr_ptr, 1)
        else:
            tk = total


# ----------------------------------------------------------------------------------------------------
# Work decomposition, workspace, launch
# ----------------------------------------------------------------------------------------------------

_p2 = _utils.p2


# Most splits per GEMM phase. More splits shorten each item but lengthen the reduction (every split's
# partial sums are read by one item): bench/gpu_model.py, 1 env, prefers 16 over 8 and 8 over 4.
_MAX_SPLITS = 16
# Rows per RED item (GPU, split phases): each row is held whole in registers with every split's partial
# sum in flight at once, so the epilogue is a few dependent L2 round trips per item, not one item's
# ~(splits + 6) per column chunk and token (bench/gpu_model.py).
_RED_ROWS = 4


def _divisor_at_least(n: int, want: int) -> int:
    """The smallest divisor of n that is >= want (n itself if none smaller)."""
    for k in range(max(1, want), n + 1):
        if n % k == 0:
            return k
    return n


@dataclass(frozen=True)
class RolloutConfig:
    """How a rollout is cut into work: BM candidates per row block, K / hidden sub-tiles, splits of the
    attention (head groups), MLP and pred_proj (hidden blocks), persistent or one launch per phase."""

    BM: int
    BK: int
    BF: int
    BE: int  # attention output column block (fp32 FMA dots need it narrower)
    BN: int  # out-projection output column block
    num_warps: int
    num_stages: int
    att_splits: int
    mlp_splits: int
    head_splits: int
    persistent: bool
    programs: int  # persistent grid size
    # > 0: the epilogue of every GEMM phase (and the modulation table's) is a phase of its own, RED, of
    # items of red_rows (candidate, token) rows each; 0: the phase's last item applies it to all BM rows
    red_rows: int = 0
    qkv_fused: bool = False  # a head's q, k and v as one GEMM tile (one K loop) instead of three
    # with RED phases: an MLP phase of several query tokens has one item per (hidden split, token),
    # not one per hidden split doing every token in turn (more, shorter items where SMs are idle)
    token_items: bool = False
    # the hidden splits of those MLP phases (0: mlp_splits): their items are splits x tokens per row
    # block, so fewer splits keep them to one wave where mlp_splits would queue them two deep
    token_splits: int = 0
    red_group: int = 4  # a RED item loads this many splits' partial sums at once

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def rollout_config(w: RolloutWeights, N: int, gpu: bool | None = None, override: dict | None = None,
                   sms: int | None = None) -> RolloutConfig:
    """The work decomposition for N candidates. GPU: row blocks of 64 candidates (a wgmma-sized M tile),
    K and hidden sub-tiles of 32, 8 warps; the attention / MLP / pred_proj GEMMs split (head groups,
    hidden blocks, reduced in a fixed order) only as much as needed to give every SM about 1.5 items
    per phase (at most _MAX_SPLITS), since each split adds a partial-sum round trip; one persistent
    launch whose programs take items in ticket order. Interpreter: one row block as large as the problem, no splits, one
    launch per phase (fewest Python-level programs). `override` sets any field (tests use it to cover
    several row blocks, splits and the persistent path on the CPU)."""
    gpu = _utils.gpu_tiles() if gpu is None else gpu
    D = w.dim
    if gpu:
        sms = sms or _sm_count()
        # bf16: wgmma tiles; fp32 (FMA dots, operands in registers): narrower K / hidden / head blocks
        wide = w.dtype != torch.float32
        # The persistent kernel holds every kind's code and sits near 255 registers; which variant fits
        # without spilling depends on the compiler (profiles/kernels_sm90.py compiles each for sm_90,
        # both tritons, at every shape a plan launches: 1, 50, 300 and 15,000 candidates):
        # bf16: RED phases take the epilogues (spread over items instead of one item alone per row
        #       block), hidden blocks of 64 (half the dependent K loops of 32), K loops pipelined 3 deep
        #       after triton 3.6 (2 on 3.6, where 3 spills); after 3.6 without splits (50 envs, every
        #       head in one item) the attention's out projection accumulates in registers (BN = BD);
        #       where the row blocks alone fill the GPU (no splits at all: 50 envs), one launch per
        #       phase and kind instead (below), with the fused epilogue, hidden blocks of 128 and 3 stages;
        # fp32: the FMA dots need the registers: the fused epilogue and 3 stages, except after 3.6 with
        #       several row blocks and splits (1 env, 300 candidates), where RED phases fit with 2
        #       stages (the split epilogues are the serial tails that dominate there; bench/gpu_model.py;
        #       one row block, the final rollout of the mean plans, spills with them).
        BM, BK, nw = 64, min(32, _p2(D)), 8
        BE, BN = (64 if wide else 32), (64 if wide else 32)
        BF = 64 if wide else 32
        RB = triton.cdiv(N, BM)
        want = max(1, math.ceil(1.5 * sms / RB))
        att = _divisor_at_least(w.heads, min(want, _MAX_SPLITS, w.heads))
        mlp = max(1, min(want, _MAX_SPLITS, triton.cdiv(w.mlp, BF)))
        head = max(1, min(want, _MAX_SPLITS, triton.cdiv(w.proj_hidden, BF)))
        newer = _triton_version() > (3, 6)
        persistent = True
        if wide and att == 1 and mlp == 1 and head == 1:
            # the row blocks alone fill the GPU (50 envs: 235 of them): no splits, so every item is its
            # row block's only one and applies its own epilogue (no RED phases), and the SMs are busy
            # with whole items, so launch gaps weigh little: one launch per phase, each compiled for its
            # own kind, has the registers the persistent kernel lacks for hidden blocks of 128, 3 stages
            # and the out projection in registers, on triton 3.6 too (profiles/README.md)
            red, ns, persistent, BF = 0, 3, False, 128
            BN, BE = _p2(D), 32
        elif wide:
            red, ns = _RED_ROWS, (3 if newer else 2)
            if newer and att == 1:  # all heads per item: the out projection in registers,
                BN, BE = _p2(D), 32  # not through the partial sums once per head (fits with BE 32)
        elif newer and RB > 1 and (att > 1 or mlp > 1):
            red, ns = _RED_ROWS, 2
        else:
            red, ns = 0, 3
        # an MLP phase with its query tokens as items (the window's steps, all of its tokens new) has
        # RB x tokens x splits items: halve its splits until they fit in one wave (1 env: 8, not 16)
        tok = mlp
        while tok > 1 and RB * w.history * tok > sms:
            tok //= 2
        # a RED item loads every split's partial sums at once (one dependent round trip, not one per
        # group of 4: fits without spills on both tritons at every shape)
        cfg = dict(BM=BM, BK=BK, BF=BF, BE=BE, BN=BN, num_warps=nw, num_stages=ns, att_splits=att,
                   mlp_splits=mlp, head_splits=head, persistent=persistent, programs=sms, red_rows=red, qkv_fused=wide,
                   red_group=_MAX_SPLITS, token_items=bool(red) and mlp > 1, token_splits=tok)
    else:
        cfg = dict(BM=_p2(N, hi=64), BK=_p2(D, hi=128), BF=_p2(max(w.mlp, w.proj_hidden, w.act_w1.shape[1]), hi=256),
                   BE=_p2(w.dim_head), BN=_p2(D), num_warps=4, num_stages=1, att_splits=1, mlp_splits=1,
                   head_splits=1, persistent=False, programs=2, red_rows=0, qkv_fused=False, red_group=4,
                   token_items=False, token_splits=0)
    if override:
        unknown = set(override) - set(cfg)
        if unknown:
            raise ValueError(f"rollout_config: unknown fields {sorted(unknown)} (known: {sorted(cfg)})")
        cfg.update(override)
        if not cfg["persistent"] and "red_rows" not in override:
            cfg["red_rows"] = 0  # one launch per phase: a RED phase would be one more launch each
    for name in ("BM", "BK", "BF", "BE", "BN"):
        v = cfg[name]
        assert v >= 16 and (v & (v - 1)) == 0, f"{name}={v}: tl.dot tiles must be powers of two >= 16"
    if w.heads % cfg["att_splits"] != 0:
        raise ValueError(f"rollout_config: att_splits={cfg['att_splits']} must divide heads={w.heads}")
    rr = cfg["red_rows"]
    if rr < 0 or (rr and (rr & (rr - 1)) != 0):
        raise ValueError(f"rollout_config: red_rows={rr} must be 0 or a power of two")
    for name in ("att_splits", "mlp_splits", "head_splits", "programs", "red_group"):
        if cfg[name] < 1:
            raise ValueError(f"rollout_config: {name} must be >= 1, got {cfg[name]}")
    if cfg["token_splits"] < 0:
        raise ValueError(f"rollout_config: token_splits must be >= 0 (0: mlp_splits), got {cfg['token_splits']}")
    return RolloutConfig(**cfg)


def _triton_version() -> tuple:
    return tuple(int(v) for v in triton.__version__.split(".")[:2])


def _sm_count() -> int:
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return 132  # an H100 SXM / H200: what GPU tiles are chosen for when there is no device


def _hidden_block(width: int, splits: int, BF: int) -> int:
    """Width of each of `splits` hidden blocks, a multiple of BF."""
    return triton.cdiv(triton.cdiv(width, splits), BF) * BF


def _hidden_widths(w: RolloutWeights, cfg: RolloutConfig) -> tuple:
    """(MLP, pred_proj, MLP with tokens as items) hidden block widths: one split's share each."""
    return (_hidden_block(w.mlp, cfg.mlp_splits, cfg.BF), _hidden_block(w.proj_hidden, cfg.head_splits, cfg.BF),
            _hidden_block(w.mlp, cfg.token_splits or cfg.mlp_splits, cfg.BF))


def build_phases(w: RolloutWeights, N: int, C: int, H: int, cfg: RolloutConfig) -> list:
    """The rollout as an ordered list of phases (dicts); each phase is a set of independent items per
    row block, and a row block's phase p may start once its phases < p are done. Items are numbered
    (tickets) phase after phase, row block after row block, split after split."""
    RB = triton.cdiv(N, cfg.BM)
    L = w.depth
    D = w.dim
    nch = triton.cdiv(L * 6 * D, _p2(D))
    steps = rollout_schedule(C, H, w.history)
    fcw, pcw, tcw = _hidden_widths(w, cfg)
    mlp_splits = triton.cdiv(w.mlp, fcw)
    head_splits = triton.cdiv(w.proj_hidden, pcw)
    phases = []

    RR = cfg.red_rows

    def add(typ, nsplit, i=0, lo=0, p0=0, T=0, q0=0, l=0, last=0, nxt=(0, 0, 0)):
        fw = fcw if typ == _MLP else pcw if typ == _HEAD else 0
        tokens = typ == _MLP and RR and cfg.token_items and T - q0 > 1
        if tokens:  # tokens as items, with hidden splits of their own
            fw = tcw
            nsplit = triton.cdiv(w.mlp, tcw)
        p = dict(type=typ, split=nsplit, i=i, lo=lo, p0=p0, T=T, q0=q0, l=l, last=last,
                 nlo=nxt[0], np0=nxt[1], nT=nxt[2], aux=0, gsplit=0, fw=fw)
        psplit = nsplit  # partial sums per (row, token)
        if tokens:  # an item per (token, hidden split) (gsplit: the hidden splits)
            p.update(split=nsplit * (T - q0), gsplit=nsplit)
        phases.append(p)
        if RR and typ != _ACT:  # its epilogue as a phase of RED items of RR rows
            p["aux"] = 1
            # rows per candidate (the kernel's nt = T - q0): its query tokens (pred_proj: the last one)
            red = dict(p, type=_RED, aux=typ, gsplit=psplit)
            if typ == _MOD:
                red.update(T=1, q0=0)  # one row per candidate
            red["split"] = triton.cdiv(cfg.BM * (red["T"] - red["q0"]), RR)
            phases.append(red)

    i0, lo0, p00, T0 = steps[0]
    add(_ACT, H)
    add(_MOD, H * nch, nxt=(lo0, p00, T0))
    for s, (i, lo, p0, T) in enumerate(steps):
        last = s == len(steps) - 1
        for l in range(L):
            add(_ATT, cfg.att_splits, i, lo, p0, T, p0, l)
            q0 = T - 1 if l == L - 1 else p0  # last layer: only the last token's output matters
            add(_MLP, mlp_splits, i, lo, p0, T, q0, l)
        nxt = (0, 0, 0) if last else tuple(steps[s + 1][1:4])
        add(_HEAD, head_splits, i, lo, p0, T, T - 1, L - 1, int(last), nxt)
    start = 0
    for p in phases:
        p["start"], p["items"] = start, RB * p["split"]
        start += p["items"]
    return phases


def _phase_table(phases: list, device) -> torch.Tensor:
    rows = []
    for p in phases:
        r = [0] * _PT_COLS
        for col, key in ((_C_TYPE, "type"), (_C_START, "start"), (_C_ITEMS, "items"), (_C_SPLIT, "split"),
                         (_C_I, "i"), (_C_LO, "lo"), (_C_P0, "p0"), (_C_T, "T"), (_C_Q0, "q0"), (_C_L, "l"),
                         (_C_LAST, "last"), (_C_NLO, "nlo"), (_C_NP0, "np0"), (_C_NT, "nT"), (_C_AUX, "aux"),
                         (_C_GSPLIT, "gsplit")):
            r[col] = int(p[key])
        rows.append(r)
    return torch.tensor(rows, dtype=torch.int32, device=device)


def _loop_trips(iters: int, stages: int) -> int:
    """Dependent L2 round trips of a K loop of `iters` tile loads software-pipelined `stages` deep
    (stages - 1 loads in flight ahead of the one consumed; 1 stage: none)."""
    return math.ceil(iters / max(stages - 1, 1)) + 1


def phase_costs(w: RolloutWeights, phases: list, cfg: RolloutConfig) -> list:
    """Per phase, for the cost model (bench/gpu_model.py), counted as the kernel computes them (padded
    tiles, BD = next power of two of D, included: that is what the tensor cores execute):

    items, split     work items (row blocks x split) and the split
    flops, l2_bytes  per item: FLOPs, bytes read from L2 (weights + activations) and written
    trips            per item: its chain of dependent L2 round trips (loads that must return before
                     the next can issue: K loops by their pipeline depth, the attention's key loop)
    tail_bytes,      what the phase's last item does alone after every item of its row block arrived
    tail_trips       (the fused epilogue: the splits' partial sums, the residual, the LayerNorms);
                     0 when a RED phase takes the epilogue over, spread over its items"""
    wb = w.dtype.itemsize
    D, BD, I3, DH = w.dim, _p2(w.dim), 3 * w.inner, w.dim_head
    BM, BK, BF, ns_ = cfg.BM, cfg.BK, cfg.BF, cfg.num_stages
    BC = min(64, BD)
    BN, BE = min(cfg.BN, BD), min(cfg.BE, _p2(DH))  # (as the launch clamps them)
    nch = triton.cdiv(D, BC)
    kl = _loop_trips(triton.cdiv(D, BK), ns_)
    Ha = w.act_w1.shape[1]
    row = D * 4  # one fp32 row
    # the fused epilogue per row (bytes, round trips): the residual update reads the partial sums, the
    # gate and x and writes x; the modulated input rows read x three times, shift and scale, write and
    # re-read the modulated rows twice and write h; the final LayerNorm reads x three times
    norm_mod = (8 * row + D * wb, 5 * nch)
    norm_plain = (3 * row + D * wb, 3 * nch)

    def prep(p):  # the next step's input rows, per candidate: z + pos -> x, then the modulated rows
        t = p["nT"] - p["np0"]
        return t * (2 * row + norm_mod[0]), t * (nch + norm_mod[1])

    out = []
    for p in phases:
        typ, ns = p["type"], p["split"]
        tn, tq = p["T"] - p["p0"], p["T"] - p["q0"]
        tail_b = tail_t = 0
        if typ == _ACT:
            fl = 2 * BM * (16 * Ha + Ha * BD)
            rd = (w.action_width * Ha + Ha * D) * wb + BM * w.action_width * 4
            wr = BM * D * wb
            trips = triton.cdiv(Ha, BF) * 3 + 1
        elif typ == _MOD:
            fl = 2 * BM * D * BD
            rd = D * BD * wb + BM * D * wb
            wr = BM * BD * 4
            trips = kl + 1
            if not p["aux"]:
                b, t = prep(p)
                tail_b, tail_t = BM * b, t
        elif typ == _ATT:
            hpg = w.heads // ns
            qw = 4 * _p2(DH) if cfg.qkv_fused else 3 * DH  # the q|k|v tile's width (fused: padded)
            fl = 2 * BM * tn * D * qw * hpg + 2 * BM * tq * DH * BD * hpg
            # the weights are re-read per token: q|k|v per new token, the out projection per query token
            rd = hpg * (tn * D * 3 * DH + tq * DH * D) * wb + BM * tn * D * wb + BM * p["T"] * 3 * DH * hpg * wb
            blocks = hpg * triton.cdiv(DH, BE)  # (head, output block) pairs: one softmax each
            if BN >= BD:  # the out projection accumulated in registers, its partial sums written once
                wr = BM * tn * 3 * DH * hpg * wb + BM * tq * D * 4
                att = sum(blocks * (t + 2) + blocks for t in range(p["q0"], p["T"]))
            else:  # the partial sums: written per block, re-read by every block after the first
                wr = BM * tn * 3 * DH * hpg * wb + BM * tq * D * 4 * blocks
                rd += BM * tq * D * 4 * (blocks - 1)
                nbn = triton.cdiv(D, BN)
                att = sum(blocks * (t + 2) + blocks * nbn + (blocks - 1) * nbn for t in range(p["q0"], p["T"]))
            trips = tn * hpg * (1 if cfg.qkv_fused else 3) * kl + att + 1
        elif typ == _RED:
            of, g = p["aux"], p["gsplit"]
            rows = cfg.red_rows
            if of == _MOD:
                b, t = prep(p)
                rd, trips = rows * b, 2 * (p["nT"] - p["np0"])
            elif of == _HEAD:
                b, t = prep(p) if not p["last"] else (0, 0)
                rd = rows * ((g + 1) * row + b)
                trips = triton.cdiv(g, cfg.red_group) + 1 + 2 * (p["nT"] - p["np0"] if not p["last"] else 0)
            else:
                # partials, gate, x (read and written), shift, scale; h
                rd, trips = rows * ((g + 5) * row + D * wb), triton.cdiv(g, cfg.red_group) + 2
            fl, wr = 0, 0
        else:
            width = p["fw"]
            if typ == _MLP and p["gsplit"]:  # tokens as items: one token each
                tq = 1
            fl = 2 * BM * tq * (D * width + width * BD)
            rd = tq * 2 * D * width * wb + BM * tq * D * wb  # (each token's pass re-reads the weights)
            wr = BM * tq * D * 4
            trips = tq * triton.cdiv(width, BF) * (kl + 1) + 1
        if typ in (_ATT, _MLP, _HEAD) and not p["aux"]:
            if typ == _HEAD:
                b, t = prep(p) if not p["last"] else (0, 0)
                tail_b, tail_t = BM * ((ns + 1) * row + b), nch * ns + t
            else:
                last_plain = typ == _MLP and p["l"] == w.depth - 1
                nb, nt_ = norm_plain if last_plain else norm_mod
                tail_b, tail_t = BM * tq * ((ns + 3) * row + nb), tq * (nch * (ns + 1) + nt_)
        name = _PHASE_NAMES[typ]
        if typ == _RED:
            name += f" {_PHASE_NAMES[p['aux']]}"
        if typ >= _ATT:
            name += f" l{p['l']} step{p['i']}"
        out.append(dict(name=name, items=p["items"], split=ns, flops=fl, l2_bytes=rd + wr, trips=trips,
                        tail_bytes=tail_b, tail_trips=tail_t))
    return out


class RolloutWorkspace:
    """Preallocated buffers of one fused rollout shape (N candidates, C context, H actions), so repeated
    rollouts (the CEM iterations, a CUDA graph) allocate nothing:

    z (N, H+1, D) f32 latents      x (N, W, D) f32 residual stream   h (N, W, D) next GEMM's input rows
    kv (L, N, W, 3I) q/k/v cache    mod (N, H, L*6*D) f32 adaLN table  se (N, H, D) SiLU(action embedding)
    part (S, N, W, D) f32 partial sums of split GEMMs                 cost (N,) f32
    ctr: [ticket, done per row block, arrivals per row block] int32;  ptab: the phase table
    (unmarked: the weights' dtype)."""

    def __init__(self, w: RolloutWeights, N: int, C: int, H: int, config: RolloutConfig | dict | None = None):
        dev, dt, f32 = w.device, w.dtype, torch.float32
        L, D, W = w.depth, w.dim, w.history
        if not isinstance(config, RolloutConfig):
            config = rollout_config(w, N, override=config)
        self.config = config
        self.key = (N, C, H, dev, dt, config)
        self.phases = build_phases(w, N, C, H, config)
        self.costs = phase_costs(w, self.phases, config)  # per phase, for launch records (the cost model)
        self.rb = triton.cdiv(N, config.BM)
        self.total = self.phases[-1]["start"] + self.phases[-1]["items"]
        splits = max(p["gsplit"] or p["split"] for p in self.phases if p["type"] in (_ATT, _MLP, _HEAD))
        self.max_split = splits
        self.ptab = _phase_table(self.phases, dev)
        self.ctr = torch.zeros(1 + 2 * self.rb, device=dev, dtype=torch.int32)
        self.z = torch.empty(N, H + 1, D, device=dev, dtype=f32)
        self.x = torch.empty(N, W, D, device=dev, dtype=f32)
        self.h = torch.empty(N, W, D, device=dev, dtype=dt)
        self.kv = torch.empty(L, N, W, 3 * w.inner, device=dev, dtype=dt)
        self.mod = torch.empty(N, H, L * 6 * D, device=dev, dtype=f32)
        self.se = torch.empty(N, H, D, device=dev, dtype=dt)
        self.part = torch.empty(splits, N, W, D, device=dev, dtype=f32)
        self.cost = torch.empty(N, device=dev, dtype=f32)
        big = max((t for t in (self.z, self.x, self.h, self.kv, self.mod, self.se, self.part)), key=torch.numel)
        if big.numel() >= 2 ** 31:  # the kernel indexes with int32 offsets
            raise ValueError(f"fused_rollout: {N} candidates need a buffer of {big.numel()} elements, more than "
                             "int32 offsets address; plan fewer environments per call")



def _dot_mode(w: RolloutWeights) -> int:
    if w.dtype == torch.float32:
        return _DOT_IEEE
    return _DOT_UPCAST if (_interpreted() and not _utils.recording()) else _DOT_NATIVE


def fused_rollout(w: RolloutWeights, z0: torch.Tensor, actions: torch.Tensor, goal: torch.Tensor | None = None,
                  *, workspace: RolloutWorkspace | None = None, config: dict | RolloutConfig | None = None):
    """The fused Triton rollout; see `_fused_rollout` (the kernels launch on the tensors' CUDA device:
    Triton itself launches on the current device, whatever the tensors' device)."""
    if torch.is_tensor(z0) and z0.is_cuda:  # (non-tensors get their clear error from the checks inside)
        with torch.cuda.device(z0.device):
            return _fused_rollout(w, z0, actions, goal, workspace=workspace, config=config)
    return _fused_rollout(w, z0, actions, goal, workspace=workspace, config=config)


def _fused_rollout(w: RolloutWeights, z0: torch.Tensor, actions: torch.Tensor, goal: torch.Tensor | None = None,
                   *, workspace: RolloutWorkspace | None = None, config: dict | RolloutConfig | None = None):
    """The fused Triton rollout (see the module docstring); the same contract as `rollout_reference`.

    z0 (N, C, D), actions (N, H, A) (floating; cast to float32 and made contiguous if needed), goal
    (E, D) or None with N % E == 0; all on the weights' device (CUDA, or CPU under TRITON_INTERPRET=1).
    Returns (preds (N, H - C + 1, D) float32, cost (N,) float32 or None). With a `workspace`, both are
    views into it, overwritten by the next call. `config` overrides the work decomposition
    (`rollout_config`'s fields)."""
    z0, actions, goal = _check_inputs(w, z0, actions, goal, need_kernel_device=not _utils.recording())
    N, C, D = z0.shape
    H = actions.shape[1]
    ws = workspace
    if ws is None:
        ws = RolloutWorkspace(w, N, C, H, config)
    elif ws.key[:5] != (N, C, H, w.device, w.dtype):
        raise ValueError(f"fused_rollout: workspace was built for (N, C, H, device, dtype) = {ws.key[:5]}, "
                         f"got {(N, C, H, w.device, w.dtype)}")
    cfg = ws.config
    Ha = w.act_w1.shape[1]
    hpg = w.heads // cfg.att_splits
    fcw, pcw, tcw = _hidden_widths(w, cfg)
    nch = triton.cdiv(w.depth * 6 * D, _p2(D))
    rows_per_goal = N // goal.shape[0] if goal is not None else 1
    args = (ws.ptab, 0, ws.total, ws.ctr, ws.rb,
            actions, z0, goal if goal is not None else ws.cost,
            ws.z, ws.x, ws.h, ws.kv, ws.mod, ws.se, ws.part, ws.cost,
            w.pos, w.act_w1, w.act_b1, w.act_w2, w.act_b2, w.mod_w, w.mod_b, w.attn_ln_w, w.attn_ln_b,
            w.qkv_w, w.out_w, w.out_b, w.mlp_ln_w, w.mlp_ln_b, w.fc1_w, w.fc1_b, w.fc2_w, w.fc2_b,
            w.norm_w, w.norm_b, w.head_w1, w.head_b1, w.head_w2, w.head_b2,
            N, C, H, w.action_width, D, w.depth, w.heads, w.dim_head, w.mlp, w.proj_hidden, Ha, w.history,
            rows_per_goal, hpg, fcw, pcw, tcw, nch,
            w.eps_mod, w.eps_attn, w.eps_mlp, w.eps_out, 1.0 / math.sqrt(w.dim_head))
    meta = dict(HAS_GOAL=goal is not None, DOT=_dot_mode(w), BM=cfg.BM, BK=cfg.BK, BF=cfg.BF, BD=_p2(D),
                BDH=_p2(w.dim_head), BC=min(64, _p2(D)), BE=min(cfg.BE, _p2(w.dim_head)), BN=min(cfg.BN, _p2(D)),
                RR=cfg.red_rows, MAXS=min(ws.max_split, cfg.red_group), QKV=cfg.qkv_fused, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    costs = ws.costs
    if cfg.persistent:
        ws.ctr.zero_()
        grid = (max(1, min(cfg.programs, ws.total)),)
        _utils.launch(_rollout_kernel, grid, *args, PERSISTENT=True, KIND=-1, tag="rollout persistent",
                      cost=dict(flops=sum(c["flops"] * c["items"] for c in costs),
                                l2_bytes=sum(c["l2_bytes"] * c["items"] + c["tail_bytes"] * (c["items"] // c["split"])
                                             for c in costs),
                                hbm_bytes=_weight_bytes(w) + ws_bytes(ws), phases=costs), **meta)
    else:
        for k, (p, c) in enumerate(zip(ws.phases, costs)):
            a = list(args)
            a[1] = k
            _utils.launch(_rollout_kernel, (p["items"],), *a, PERSISTENT=False, KIND=p["type"],
                          tag=f"rollout {c['name']}",
                          cost=dict(flops=c["flops"] * c["items"],
                                    l2_bytes=c["l2_bytes"] * c["items"] + c["tail_bytes"] * (c["items"] // c["split"]),
                                    phases=[c]), **meta)
    return ws.z[:, C:], (ws.cost if goal is not None else None)


def _weight_bytes(w: RolloutWeights) -> int:
    return sum(t.numel() * t.element_size() for t in w.tensors().values())


def ws_bytes(ws: RolloutWorkspace) -> int:
    """Bytes of a workspace's activation buffers (what one rollout touches besides the weights)."""
    return sum(t.numel() * t.element_size() for t in (ws.z, ws.x, ws.h, ws.kv, ws.mod, ws.se, ws.part, ws.cost))
