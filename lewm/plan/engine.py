"""The fast planner: the same CEM as `cem.CEMPlanner`, built for speed.

    planner = FastPlanner(model)                          # same constructor as CEMPlanner, plus options
    res = planner.plan(start_frames, goal_frames)         # (E, H, W, 3) uint8 each -> PlanResult

What makes it fast (each step is exact: it computes what the reference computes, to fp rounding):

* start and goal are encoded once per plan (the reference system re-encoded them every iteration);
* the rollout uses a KV cache while the predictor's window grows and recomputes the window only once
  it slides (absolute positions shift; see lewm_kernels.rollout): 9 token-passes per candidate
  instead of 12 at horizon 5; the AdaLN modulation is computed once per action, not per token-pass;
  the last layer runs attention and MLP for the last token only;
* the whole CEM loop (sampling from the given noise, rollout, cost, top-k, refit, all iterations, and
  the encoding) has static shapes and no host synchronisation (no .item(), .cpu(), no Python branch on
  a tensor value), so on CUDA it is captured once per input shape into ONE CUDA graph and replayed;
* on CUDA the rollout is the fused Triton rollout (`lewm_kernels.rollout.fused_rollout`: one
  persistent kernel per rollout, or one launch per phase where the candidates alone fill the GPU
  (many environments, bf16); terminal cost fused), in bfloat16 with fp32 accumulation by default
  (float32 selectable);
* many environments are planned in one call (all E * samples candidates in one rollout).

Backends (`backend=`): "triton" (fused kernels; CUDA, or the CPU under TRITON_INTERPRET=1 for tests),
"torch" (the plain-PyTorch KV-cache rollout, `rollout_reference`), "compile" (that rollout under
torch.compile), "auto" (triton + CUDA graph on CUDA; "torch" on the CPU, the fastest CPU option
measured: profiles/README.md). Where a choice needs hardware that is missing, the
planner falls back with a one-line notice.

Identical draws: `plan(start, goal, noise)` consumes noise exactly as CEMPlanner does (noise[it] for
iteration it, candidate 0 = the mean), and with noise=None both planners draw it the same way from
their seeded generators, so FastPlanner and CEMPlanner with equal seeds see equal noise.

Benchmark: `python bench/planning_latency.py` (reference re-encoding, reference, FastPlanner and a
DINO-WM-cost planner on the same frames and noise, plans checked first; `--backend`, `--dtype` choose
the fast planner's options); the measured and modelled numbers are in profiles/README.md. On the CPU
the planner is GEMM-bound and the gain is the FLOP saving; torch.compile of the rollout ("compile")
costs a long compilation per shape (profiles/README.md), so "auto" stays eager on the CPU.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import replace

import torch

from lewm_kernels import _utils
from lewm_kernels import rollout as _kr
from lewm_kernels.reach_cost import fusable, fused_reach_cost, head_tensors
from lewm_kernels.rollout import RolloutWeights, RolloutWorkspace, fused_rollout, rollout_reference

from ..model import LeWM
from .cem import Planner, PlanResult, candidate_context

BACKENDS = ("auto", "triton", "torch", "compile")


def _notice(msg: str) -> None:
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------------------
# Packing a model into the kernels' weight layout
# ----------------------------------------------------------------------------------------------------


def pack_predictor(model: LeWM, dtype: torch.dtype = torch.float32, device=None):
    """LeWM -> `lewm_kernels.rollout.RolloutWeights`: the action encoder, predictor and pred_proj as
    stacked per-layer tensors, GEMM weights transposed to (in, out) and cast to `dtype`.

    Exact foldings (done in float64, then rounded once): the action encoder's Conv1d(kernel 1) into
    its first Linear (no nonlinearity between them), and pred_proj's eval-mode BatchNorm into its
    first Linear. The planner uses the model in eval mode, as the reference does."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"pack_predictor: dtype must be float32, bfloat16 or float16, got {dtype}")
    p, ae, pp = model.predictor, model.action_encoder, model.pred_proj
    dev = torch.device(device) if device is not None else model.action_mean.device
    f64 = torch.float64

    def g(t):  # detached float64 copy
        return t.detach().to(f64)

    blocks = list(p.blocks)
    b0 = blocks[0]
    for b in blocks:
        if b.norm1.elementwise_affine or b.norm2.elementwise_affine:
            raise ValueError("pack_predictor: the block's first LayerNorms must have no affine parameters")
    eps_mod = b0.norm1.eps
    eps_attn = b0.attn.norm.eps
    eps_mlp = b0.mlp.net[0].eps
    # Conv1d(k=1) then Linear: W = W1 @ Wc, b = W1 @ bc + b1
    wc = g(ae.patch_embed.weight)[:, :, 0]  # (smoothed, A)
    bc = g(ae.patch_embed.bias)
    w1, b1 = g(ae.embed[0].weight), g(ae.embed[0].bias)  # (Ha, smoothed)
    act_w1 = (w1 @ wc).T  # (A, Ha)
    act_b1 = w1 @ bc + b1
    # pred_proj: Linear -> BN(eval) -> GELU -> Linear; BN folded into the Linear
    bn = pp.bn
    s = torch.rsqrt(g(bn.running_var) + bn.eps)
    if bn.weight is not None:
        s = s * g(bn.weight)
    shift = g(bn.bias) if bn.bias is not None else torch.zeros_like(s)
    head_w1 = (g(pp.fc1.weight) * s[:, None]).T  # (D, P)
    head_b1 = (g(pp.fc1.bias) - g(bn.running_mean)) * s + shift

    def stack(fn):
        return torch.stack([fn(b) for b in blocks])

    def lin_t(m):  # nn.Linear weight (out, in) -> (in, out)
        return g(m.weight).T

    w = RolloutWeights(
        depth=len(blocks), heads=b0.attn.heads, dim_head=b0.attn.to_qkv.out_features // (3 * b0.attn.heads),
        history=p.pos_embedding.shape[1], eps_mod=eps_mod, eps_attn=eps_attn, eps_mlp=eps_mlp,
        eps_out=p.norm.eps,
        pos=g(p.pos_embedding[0]),
        act_w1=act_w1, act_b1=act_b1, act_w2=lin_t(ae.embed[2]), act_b2=g(ae.embed[2].bias),
        mod_w=torch.cat([lin_t(b.adaLN_modulation[1]) for b in blocks], 1),
        mod_b=torch.cat([g(b.adaLN_modulation[1].bias) for b in blocks]),
        attn_ln_w=stack(lambda b: g(b.attn.norm.weight)), attn_ln_b=stack(lambda b: g(b.attn.norm.bias)),
        qkv_w=stack(lambda b: lin_t(b.attn.to_qkv)),
        out_w=stack(lambda b: lin_t(b.attn.to_out[0])), out_b=stack(lambda b: g(b.attn.to_out[0].bias)),
        mlp_ln_w=stack(lambda b: g(b.mlp.net[0].weight)), mlp_ln_b=stack(lambda b: g(b.mlp.net[0].bias)),
        fc1_w=stack(lambda b: lin_t(b.mlp.net[1])), fc1_b=stack(lambda b: g(b.mlp.net[1].bias)),
        fc2_w=stack(lambda b: lin_t(b.mlp.net[4])), fc2_b=stack(lambda b: g(b.mlp.net[4].bias)),
        norm_w=g(p.norm.weight), norm_b=g(p.norm.bias),
        head_w1=head_w1, head_b1=head_b1, head_w2=lin_t(pp.fc2), head_b2=g(pp.fc2.bias),
    )
    w = replace(w, **{name: t.to(torch.float32) for name, t in w.tensors().items()})
    return w.to(device=dev, dtype=dtype).validate()


# ----------------------------------------------------------------------------------------------------
# The planner
# ----------------------------------------------------------------------------------------------------


class FastPlanner(Planner):
    """CEM with the fast rollout, one CUDA graph per plan shape (see the module docstring).

    Same constructor and `plan(start, goal, noise=None) -> PlanResult` as CEMPlanner, plus:
      backend     "auto" | "triton" | "torch" | "compile"
      dtype       None (default) = bfloat16 on CUDA (tensor cores, fp32 accumulation), float32 on the
                  CPU; or torch.float32 / torch.bfloat16: the rollout's GEMM weights and inputs
      cuda_graph  None = on where CUDA is; True asks for it (notice if there is no CUDA); False = off
      kernel_config  overrides of the Triton rollout's work decomposition (fields of
                  `lewm_kernels.rollout.RolloutConfig`: BM, BK, BF, BE, num_warps, att_splits,
                  mlp_splits, head_splits, persistent, programs)
      max_graphs  how many captured plan shapes are kept (least recently used dropped)

    The model's weights are packed once at construction: call `refresh()` after changing them."""

    def __init__(self, model: LeWM, samples: int = 300, elites: int = 30, iterations: int = 30,
                 horizon: int = 5, var_scale: float = 1.0, seed: int | None = 42, *, backend: str = "auto",
                 dtype: torch.dtype | None = None, cuda_graph: bool | None = None,
                 kernel_config: dict | None = None, max_graphs: int = 4, init=None):
        super().__init__(model, samples, elites, iterations, horizon, var_scale, seed)
        self.init = init  # an IDM head: the first mean is its proposal (lewm/plan/idm.py)
        if backend not in BACKENDS:
            raise ValueError(f"FastPlanner: unknown backend '{backend}' (known: {', '.join(BACKENDS)})")
        if dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError(f"FastPlanner: dtype must be torch.float32 or torch.bfloat16, got {dtype}")
        on_cuda = self.device.type == "cuda"
        if dtype is None:
            dtype = torch.bfloat16 if on_cuda else torch.float32
        self.requested_backend = backend
        self.backend = self._resolve_backend(backend, on_cuda)
        if cuda_graph and not on_cuda:
            _notice(f"FastPlanner: cuda_graph=True needs the model on CUDA (it is on {self.device}); "
                    "planning without a graph")
        self.use_graph = bool(on_cuda if cuda_graph is None else cuda_graph) and on_cuda
        self.dtype = dtype
        self.kernel_config = dict(kernel_config) if kernel_config else None
        self.max_graphs = max(1, int(max_graphs))
        self._graphs: OrderedDict = OrderedDict()
        self._compiled = None
        self.refresh()

    # -- setup -----------------------------------------------------------------------------------
    def _resolve_backend(self, backend: str, on_cuda: bool) -> str:
        if backend == "auto":
            return "triton" if on_cuda else "torch"
        if backend == "triton" and not on_cuda:
            if _kr._interpreted() or _utils.recording():
                return "triton"  # the Triton interpreter on CPU tensors (tests), or launches only recorded
            _notice(f"FastPlanner: backend 'triton' needs CUDA (the model is on {self.device}); "
                    "using the PyTorch KV-cache rollout")
            return "torch"
        return backend

    def refresh(self) -> None:
        """Re-pack the model's weights (after training or loading new ones) and drop captured graphs."""
        self.weights = pack_predictor(self.model, self.dtype, self.device)
        self._graphs.clear()
        self._workspaces: dict = {}
        self._reach = None  # (head, its tensors as the fused reach-cost kernel reads them)

    # -- the rollout -----------------------------------------------------------------------------
    def _rollout_cost(self, ctx: torch.Tensor, zg: torch.Tensor, cand: torch.Tensor,
                      final: bool = False) -> torch.Tensor:
        """ctx (E * S, 1, D) context latents, zg (E, D), cand (E, S, H, Wd) -> (E, S) terminal costs.
        `final`: the one-candidate rollout of the final mean (the compile backend runs it eagerly rather
        than compiling a second shape). The returned costs are a view of the rollout workspace: read
        them before the next rollout."""
        E, S = cand.shape[:2]
        acts = cand.reshape(E * S, self.horizon, self.width)
        backend = self.backend
        if _utils.recording() and self.requested_backend in ("auto", "triton"):
            backend = "triton"  # launches recorded, not run: what the GPU path would launch
        if backend == "triton":
            key = (E * S, 1, self.horizon)
            ws = self._workspaces.get(key)
            if ws is None:
                ws = self._workspaces[key] = RolloutWorkspace(self.weights, *key, config=self.kernel_config)
            preds, cost = fused_rollout(self.weights, ctx, acts, zg, workspace=ws)
        elif backend == "compile" and not final:
            if self._compiled is None:
                self._compiled = torch.compile(rollout_reference, dynamic=False)
            preds, cost = self._compiled(self.weights, ctx, acts, zg, check=False)
        else:
            preds, cost = rollout_reference(self.weights, ctx, acts, zg, check=False)
        gc = self.goal_cost
        if gc is None or gc.mode == "l2":
            return cost.view(E, S)
        # the reachability cost (reach.GoalCost) of the final latents: on the Triton path one fused kernel
        # after the rollout (lewm_kernels/reach_cost.py), elsewhere the head in PyTorch
        if backend == "triton" and fusable(gc.head):
            if self._reach is None or self._reach[0] is not gc.head:
                self._reach = (gc.head, head_tensors(gc.head))
            return fused_reach_cost(self._reach[1], preds[:, -1], zg, gc.mode, gc.weight,
                                    bf16=self.dtype == torch.bfloat16).view(E, S)
        return gc(preds[:, -1].reshape(E, S, -1), zg)

    def _cem(self, z0: torch.Tensor, zg: torch.Tensor, noise: torch.Tensor):
        """The whole CEM loop on the device; static shapes, no host synchronisation.
        z0, zg (E, D); noise (iterations, E, S, H, Wd) -> (mean (E, H, Wd), final cost (E,))."""
        S = noise.shape[2]
        mean = self.initial_mean(z0, zg)
        std = torch.full_like(mean, self.var_scale)
        idx_shape = (-1, -1, self.horizon, self.width)
        ctx = candidate_context(z0, S)  # once per plan
        for it in range(self.iterations):
            cand = mean[:, None] + std[:, None] * noise[it]  # (E, S, H, Wd)
            cand[:, 0] = mean
            cost = self._rollout_cost(ctx, zg, cand)
            idx = cost.topk(self.elites, dim=1, largest=False).indices  # (E, k)
            elite = torch.gather(cand, 1, idx[:, :, None, None].expand(*idx_shape))
            mean, std = elite.mean(1), elite.std(1)
        final = self._rollout_cost(z0[:, None], zg, mean[:, None], final=True)[:, 0].clone()
        return mean, final

    def _body(self, start: torch.Tensor, goal: torch.Tensor, noise: torch.Tensor):
        z0 = self.model.encode(start).float()  # once per plan
        zg = self.model.encode(goal).float()
        return self._cem(z0, zg, noise)

    # -- planning --------------------------------------------------------------------------------
    @torch.no_grad()
    def plan(self, start, goal, noise: torch.Tensor | None = None) -> PlanResult:
        start, goal, noise = self._inputs(start, goal, noise)
        if not noise.is_floating_point():
            raise TypeError(f"noise must be a floating tensor, got {noise.dtype}")
        noise = noise.float()
        if self.use_graph:
            # Triton launches on the *current* CUDA device, whatever the tensors' device
            with torch.cuda.device(self.device):
                mean, final = self._plan_graphed(start, goal, noise)
        elif self.device.type == "cuda":
            with torch.cuda.device(self.device):
                mean, final = self._body(start.to(self.device), goal.to(self.device), noise)
        else:
            mean, final = self._body(start.to(self.device), goal.to(self.device), noise)
        return PlanResult(mean, self.to_raw(mean), final)

    def _plan_graphed(self, start, goal, noise):
        key = (tuple(start.shape), start.dtype, tuple(goal.shape), goal.dtype, tuple(noise.shape))
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(start, goal, noise)
            self._graphs[key] = entry
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        graph, s_start, s_goal, s_noise, (mean, final) = entry
        s_start.copy_(start, non_blocking=True)
        s_goal.copy_(goal, non_blocking=True)
        s_noise.copy_(noise, non_blocking=True)
        graph.replay()
        return mean.clone(), final.clone()

    def _capture(self, start, goal, noise):
        dev = self.device
        s_start = torch.empty(start.shape, dtype=start.dtype, device=dev)
        s_goal = torch.empty(goal.shape, dtype=goal.dtype, device=dev)
        s_noise = torch.empty(noise.shape, dtype=torch.float32, device=dev)
        s_start.copy_(start)
        s_goal.copy_(goal)
        s_noise.copy_(noise)
        # warm up on a side stream (Triton compilation, cuBLAS handles, torch.compile) before capture
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._body(s_start, s_goal, s_noise)
        torch.cuda.current_stream(dev).wait_stream(side)
        torch.cuda.synchronize(dev)
        graph = torch.cuda.CUDAGraph()
        # capture on the warm-up stream (one cuBLAS workspace); "thread_local" so that another
        # thread's CUDA calls (a DataLoader's pin-memory thread, say) cannot invalidate the capture
        with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
            out = self._body(s_start, s_goal, s_noise)
        return graph, s_start, s_goal, s_noise, out
