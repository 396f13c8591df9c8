"""The fused predictor rollout (lewm_kernels.rollout) against the model's own reference rollout.

Three implementations of one computation are compared:
  LeWM.rollout + the terminal cost     the model (cache-free, the oracle of everything)
  rollout_reference                     plain PyTorch, KV cache while the window grows, recompute when it slides
  fused_rollout                         the Triton kernels (TRITON_INTERPRET=1 on this CPU, see conftest.py)

CPU tolerance (float32 everywhere): atol 2e-5 + rtol 2e-5 on latents of magnitude ~1 (observed error
~4e-7: only the summation order differs), 1e-4 relative on costs. GPU tests (marked gpu) compare the
kernel in fp32 and bf16 with a float64 reference under the flash-attention rule: kernel error <= 2 x
eager PyTorch's own error in the same dtype + a small atol.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import lewm
from lewm.plan.engine import pack_predictor
from lewm_kernels import rollout as kr
from lewm_kernels import _utils
from lewm_kernels.rollout import (RolloutWorkspace, build_phases, fused_rollout, rollout_config, rollout_reference,
                                  rollout_schedule, token_passes)

ATOL = 2e-5
RTOL = 2e-5


# Tiny problems on a shared 2-core machine: one intra-op thread avoids OpenMP contention with other
# processes (measured: the same test 4 s with one thread, up to 19 s with two under load).
pytestmark = pytest.mark.usefixtures("single_thread")
interp = pytest.mark.interp  # runs the Triton kernel on CPU tensors (TRITON_INTERPRET=1; skipped on CUDA machines)

# Work decompositions the interpreter runs (it defaults to one row block, no splits, one launch per
# phase): several row blocks with a partial last one, every GEMM split (partial sums reduced by the
# last item to finish), the persistent kernel that takes items in ticket order, and the epilogues as
# RED phases of a few rows per item (the GPU default in bf16).
SPLIT = dict(BM=16, att_splits=2, mlp_splits=3, head_splits=2)
PERSISTENT = dict(SPLIT, persistent=True, programs=3)
RED = dict(PERSISTENT, red_rows=8)
# the attention's out projection in BN-wide column blocks through the partial sums (BN < the padded
# width; the GPU's way at 1 env and in fp32) instead of one accumulator in registers across heads
NARROW = dict(RED, BN=16, BE=16)
# an MLP phase of several query tokens as one item per (hidden split, token) (the GPU's way at 1 env)
TOKENS = dict(RED, token_items=True)
# ... with hidden splits of their own (fewer than the MLP phases of one query token have): 4 blocks of
# 16 where one query token is new, 2 of 32 where the window's tokens are all items (the GPU's way at 1 env)
TOKEN_SPLITS = dict(TOKENS, BF=16, mlp_splits=4, token_splits=2)
# no splits, one launch per phase, the fused epilogue, q | k | v as one tile and the out projection in
# registers across heads (the GPU's way in bf16 when the row blocks alone fill it: 50 envs)
FILLED = dict(BM=16, att_splits=1, mlp_splits=1, head_splits=1, persistent=False, red_rows=0, BF=32, BE=16,
              BN=32, qkv_fused=True, num_stages=3)

# dims that are not powers of two (masking paths): D 40, 3 heads x 20, MLP 72, pred_proj 48, action width 15
ODD = {"embed_dim": 40, "pred_heads": 3, "pred_dim_head": 20, "pred_mlp": 72, "proj_hidden": 48,
       "action_hidden": 24, "action_dim": 3, "pred_depth": 2}


def make_model(seed: int = 0, **model_overrides) -> lewm.LeWM:
    """A small LeWM whose predictor does real work: the adaLN-zero Linears start at zero (every block
    the identity), so they get random weights here; pred_proj's BatchNorm gets non-trivial stats."""
    torch.manual_seed(seed)
    cfg = lewm.preset("tiny", model=model_overrides) if model_overrides else lewm.preset("tiny")
    m = lewm.LeWM(cfg).eval()
    with torch.no_grad():
        for b in m.predictor.blocks:
            torch.nn.init.normal_(b.adaLN_modulation[1].weight, std=0.3)
            torch.nn.init.normal_(b.adaLN_modulation[1].bias, std=0.3)
        bn = m.pred_proj.bn
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0, 0.2)
    return m


@pytest.fixture(scope="module")
def tiny():
    m = make_model(0)
    return m, pack_predictor(m)


@pytest.fixture(scope="module")
def odd():
    m = make_model(1, **ODD)
    return m, pack_predictor(m)


def inputs(m: lewm.LeWM, N: int, C: int, H: int, E: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    D, A = m.mcfg.embed_dim, m.mcfg.action_input_dim
    return (torch.randn(N, C, D, generator=g), torch.randn(N, H, A, generator=g), torch.randn(E, D, generator=g))


def model_rollout(m, z0, a, goal):
    """The oracle: LeWM.rollout and the terminal cost of its last latent."""
    preds = m.rollout(z0, a)
    E = goal.shape[0]
    cost = (preds[:, -1].reshape(E, -1, preds.shape[-1]) - goal[:, None]).pow(2).sum(-1).reshape(-1)
    return preds, cost


def assert_close(preds, cost, ref_preds, ref_cost):
    torch.testing.assert_close(preds, ref_preds, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(cost, ref_cost, atol=1e-5, rtol=1e-4)


# (N, C, H): N=1 and N not a power of two; C = 1, 2, 3 and C > history (4); horizons 1..5, so the
# growing (KV cache) and the sliding (recompute) phases are both covered
SHAPES = [(1, 1, 1), (7, 1, 5), (3, 1, 3), (5, 2, 4), (3, 3, 5), (2, 4, 5), (6, 2, 2)]


def test_schedule_counts_token_passes():
    # one context frame, horizon 5, window 3: grow 1, 2, 3 (one new token each), then slide twice
    assert rollout_schedule(1, 5, 3) == [(0, 0, 0, 1), (1, 0, 1, 2), (2, 0, 2, 3), (3, 1, 0, 3), (4, 2, 0, 3)]
    assert token_passes(1, 5, 3) == (9, 12)
    assert rollout_schedule(3, 5, 3) == [(2, 0, 0, 3), (3, 1, 0, 3), (4, 2, 0, 3)]
    assert rollout_schedule(4, 5, 3)[0] == (3, 1, 0, 3)  # more context than the window: slides at once
    with pytest.raises(ValueError, match="context"):
        rollout_schedule(3, 2, 3)


@pytest.mark.parametrize("N,C,H", SHAPES)
def test_reference_matches_model_rollout(tiny, N, C, H):
    m, w = tiny
    z0, a, goal = inputs(m, N, C, H)
    preds, cost = rollout_reference(w, z0, a, goal)
    assert preds.shape == (N, H - C + 1, m.mcfg.embed_dim) and cost.shape == (N,)
    assert_close(preds, cost, *model_rollout(m, z0, a, goal))


def test_reference_odd_dims(odd):
    m, w = odd
    z0, a, goal = inputs(m, 5, 1, 5)
    assert_close(*rollout_reference(w, z0, a, goal), *model_rollout(m, z0, a, goal))


def test_positions_matter_so_a_sliding_window_is_recomputed(tiny):
    """Why the window is recomputed once it slides: with a learned absolute positional embedding, keeping
    cached keys/values across a slide gives a different answer. Zeroing the positional embedding makes
    positions irrelevant; the model's answer then changes, so positions matter in this model."""
    m, w = tiny
    z0, a, goal = inputs(m, 4, 1, 5)
    ref = m.rollout(z0, a)
    w0 = replace(w, pos=torch.zeros_like(w.pos))
    assert (rollout_reference(w0, z0, a)[0] - ref).abs().max() > 1e-3


@interp
@pytest.mark.parametrize("N,C,H", SHAPES)
def test_fused_matches_model_rollout(tiny, N, C, H):
    m, w = tiny
    z0, a, goal = inputs(m, N, C, H)
    preds, cost = fused_rollout(w, z0, a, goal)
    assert preds.shape == (N, H - C + 1, m.mcfg.embed_dim) and cost.shape == (N,)
    assert_close(preds, cost, *model_rollout(m, z0, a, goal))


@interp
@pytest.mark.parametrize("N,C,H", [(5, 1, 5), (3, 2, 4)])
def test_fused_odd_dims(odd, N, C, H):
    m, w = odd
    z0, a, goal = inputs(m, N, C, H)
    want = model_rollout(m, z0, a, goal)
    assert_close(*fused_rollout(w, z0, a, goal), *want)
    if N == 5:  # the out projection in 16-wide blocks of the padded 64: a partial last block
        assert_close(*fused_rollout(w, z0, a, goal, config=dict(BN=16, BE=16)), *want)


@interp
@pytest.mark.parametrize("config", [SPLIT, PERSISTENT, RED, NARROW, TOKENS, TOKEN_SPLITS, FILLED],
                         ids=["split", "persistent", "persistent-red", "persistent-red-narrow-out",
                              "persistent-red-token-items", "persistent-red-token-items-own-splits",
                              "phased-unsplit-fused-qkv"])
def test_fused_several_goals_row_blocks_and_splits(tiny, config):
    """Candidates grouped by goal (N = E * S), several row blocks (the last one partial), every GEMM
    split, one launch per phase or the persistent kernel: the model's answer each time."""
    m, w = tiny
    z0, a, goal = inputs(m, 24, 1, 5, E=3)
    assert_close(*fused_rollout(w, z0, a, goal, config=config), *model_rollout(m, z0, a, goal))


@interp
@pytest.mark.slow
def test_persistent_equals_phased_and_is_deterministic(odd):
    """The persistent kernel runs the same items as the phase-by-phase launches and sums the splits in
    the same fixed order: bitwise the same answer, run after run (here with RED phases of 8 rows, so
    a row block's epilogue is spread over several items)."""
    m, w = odd
    z0, a, goal = inputs(m, 20, 2, 5)
    cfg = dict(SPLIT, att_splits=3, red_rows=8)
    p1, c1 = fused_rollout(w, z0, a, goal, config=cfg)
    p2, c2 = fused_rollout(w, z0, a, goal, config=dict(cfg, persistent=True, programs=2))
    p3, c3 = fused_rollout(w, z0, a, goal, config=dict(cfg, persistent=True, programs=2))
    assert torch.equal(p1, p2) and torch.equal(c1, c2) and torch.equal(p2, p3) and torch.equal(c2, c3)
    assert_close(p1, c1, *model_rollout(m, z0, a, goal))


@interp
def test_fused_workspace_reuse(tiny):
    m, w = tiny
    z0, a, goal = inputs(m, 6, 1, 4, E=2)
    ws = RolloutWorkspace(w, 6, 1, 4)
    p1, c1 = fused_rollout(w, z0, a, goal, workspace=ws)
    p1, c1 = p1.clone(), c1.clone()
    z0b, ab, goalb = inputs(m, 6, 1, 4, E=2, seed=1)
    fused_rollout(w, z0b, ab, goalb, workspace=ws)  # overwrites the workspace
    p2, c2 = fused_rollout(w, z0, a, goal, workspace=ws)
    assert torch.equal(p1, p2) and torch.equal(c1, c2)
    with pytest.raises(ValueError, match="workspace was built for"):
        fused_rollout(w, z0[:3], a[:3], goal[:1], workspace=ws)


@interp
def test_fused_bf16_weights_run(tiny):
    """bf16 GEMM weights through the kernels (the interpreter computes bf16 dots in fp32 and truncates
    bf16 stores, so only a loose check here; the GPU test below holds bf16 to the 2x rule)."""
    m, w = tiny
    wb = w.to(dtype=torch.bfloat16)
    assert wb.dtype == torch.bfloat16 and wb.pos.dtype == torch.float32
    z0, a, goal = inputs(m, 5, 1, 5)
    preds, cost = fused_rollout(wb, z0, a, goal)
    ref, _ = model_rollout(m, z0, a, goal)
    assert torch.isfinite(preds).all() and torch.isfinite(cost).all()
    assert (preds - ref).abs().max() < 0.1 * ref.abs().max()


@interp
def test_no_goal_returns_no_cost(tiny):
    m, w = tiny
    z0, a, _ = inputs(m, 3, 1, 3)
    for fn in (fused_rollout, rollout_reference):
        preds, cost = fn(w, z0, a)
        assert cost is None
        torch.testing.assert_close(preds, m.rollout(z0, a), atol=ATOL, rtol=RTOL)


# -- bad inputs: clear errors (or a cheap copy), never a silent wrong answer -------------------------


@interp
@pytest.mark.parametrize("fn", [fused_rollout, rollout_reference])
def test_bad_inputs(tiny, fn):
    m, w = tiny
    z0, a, goal = inputs(m, 4, 1, 3, E=2)
    with pytest.raises(ValueError, match="latent width"):
        fn(w, z0[..., :-1], a, goal)
    with pytest.raises(ValueError, match="actions have width"):
        fn(w, z0, a[..., :-1], goal)
    with pytest.raises(ValueError, match="candidates but actions"):
        fn(w, z0, a[:3], goal)
    with pytest.raises(ValueError, match="at least as many actions"):
        fn(w, torch.randn(4, 3, z0.shape[-1]), a[:, :2], goal)
    with pytest.raises(ValueError, match="split evenly"):
        fn(w, z0, a, torch.randn(3, z0.shape[-1]))
    with pytest.raises(ValueError, match="must have 3 dims"):
        fn(w, z0[:, 0], a, goal)
    with pytest.raises(TypeError, match="floating"):
        fn(w, z0, a.long(), goal)
    with pytest.raises(TypeError, match="torch.Tensor"):
        fn(w, z0.numpy(), a, goal)
    with pytest.raises(ValueError, match="is on meta"):
        fn(w, z0.to("meta"), a, goal)


@interp
@pytest.mark.parametrize("fn", [fused_rollout, rollout_reference])
def test_noncontiguous_and_float64_inputs_are_copied(tiny, fn):
    m, w = tiny
    z0, a, goal = inputs(m, 4, 1, 3, E=2)
    want = fn(w, z0, a, goal)
    a_nc = torch.stack([a, torch.zeros_like(a)], -1)[..., 0]  # non-contiguous view with the same values
    assert not a_nc.is_contiguous()
    got = fn(w, z0.double(), a_nc, goal.t().contiguous().t())
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def test_kernels_refuse_cpu_tensors_without_the_interpreter(tiny, monkeypatch):
    m, w = tiny
    monkeypatch.setattr(kr, "_interpreted", lambda: False)
    z0, a, goal = inputs(m, 2, 1, 2)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        fused_rollout(w, z0, a, goal)


def test_weights_validate(tiny):
    _, w = tiny
    with pytest.raises(ValueError, match="qkv_w has shape"):
        replace(w, qkv_w=w.qkv_w[:, :, :-1]).validate()
    with pytest.raises(ValueError, match="share one dtype"):
        replace(w, fc1_w=w.fc1_w.bfloat16()).validate()


def test_config_is_dot_sized_and_checked(tiny):
    _, w = tiny
    c = rollout_config(w, 3, gpu=False)
    assert min(c.BM, c.BK, c.BF, c.BE) >= 16 and not c.persistent
    with pytest.raises(AssertionError, match=">= 16"):
        rollout_config(w, 64, gpu=False, override={"BK": 8})
    with pytest.raises(ValueError, match="must divide heads"):
        rollout_config(w, 64, gpu=False, override={"att_splits": 3})
    with pytest.raises(ValueError, match="unknown fields"):
        rollout_config(w, 64, gpu=False, override={"BLOCK_M": 16})


def test_gpu_decomposition_at_the_planners_shapes():
    """What the GPU gets (chosen here without one): wgmma-sized row blocks of 64 candidates, K blocks
    of 32, one persistent launch; splits only where row blocks are too few to fill the SMs (1 env: 300
    candidates), none at 50 envs (15,000), where bf16 takes one launch per phase instead (each kind
    compiled alone: hidden blocks of 128, 3 stages, the fused epilogue). The pipeline depth and where
    RED phases are used depend on the triton version (what keeps the kernels free of spills there:
    profiles/kernels_sm90.py checks it)."""
    m = lewm.LeWM(lewm.preset("pusht")).eval()
    newer = kr._triton_version() > (3, 6)
    for dtype in (torch.bfloat16, torch.float32):
        bf16 = dtype == torch.bfloat16
        w = pack_predictor(m, dtype=dtype)
        one, fifty = rollout_config(w, 300, gpu=True, sms=132), rollout_config(w, 15000, gpu=True, sms=132)
        final = rollout_config(w, 50, gpu=True, sms=132)  # one row block: the mean plans' final rollout
        assert one.BM == fifty.BM == 64 and one.BK == 32 and one.persistent and final.persistent
        assert fifty.persistent != bf16
        assert one.att_splits > 1 and one.mlp_splits > 1 and 16 % one.att_splits == 0
        assert fifty.att_splits == fifty.mlp_splits == fifty.head_splits == 1
        # bf16: every epilogue a RED phase, hidden blocks of 64, 3 stages after triton 3.6; fp32: the
        # fused epilogue and 3 stages, but RED phases (2 stages) with splits and row blocks after 3.6
        if bf16:
            assert one.red_rows > 0 and final.red_rows > 0 and one.qkv_fused and fifty.qkv_fused
            assert one.BF == 64 and one.num_stages == (3 if newer else 2)
            assert fifty.red_rows == 0 and fifty.BF == 128 and fifty.num_stages == 3 and fifty.BN == 256
        else:
            assert fifty.red_rows == final.red_rows == 0 and fifty.num_stages == 3 and not one.qkv_fused
            assert (one.red_rows > 0) == newer and one.num_stages == (2 if newer else 3) and one.BF == 32
        # with RED phases and splits (1 env), the MLP phases of several tokens have an item per token
        assert one.token_items == (one.red_rows > 0) and not fifty.token_items
        # the phase list: 2 setup phases, then per step 2 per layer + pred_proj; with RED, each but the
        # first followed by its RED phase
        for c, n in ((one, 300), (fifty, 15000)):
            phases = build_phases(w, n, 1, 5, c)
            assert len(phases) == (1 + 2 * (1 + 5 * (2 * 6 + 1)) if c.red_rows else 2 + 5 * (2 * 6 + 1))
            reds = [p for p in phases if p["type"] == 5]
            assert all(p["split"] * c.red_rows >= c.BM * (p["T"] - p["q0"]) for p in reds)


def test_launches_recorded_without_running(tiny):
    """Inside record_launches the wrapper runs nothing (CPU tensors, no interpreter needed) and records
    each launch with its grid, GPU tiles and a cost: one launch per phase, or one persistent launch."""
    m = lewm.LeWM(lewm.preset("pusht")).eval()
    w = pack_predictor(m, dtype=torch.bfloat16)
    z0, a, goal = torch.randn(300, 1, 192), torch.randn(300, 5, 10), torch.randn(1, 192)
    with _utils.record_launches() as rec:
        fused_rollout(w, z0, a, goal)
    assert len(rec) == 1 and rec[0].meta["PERSISTENT"] and rec[0].meta["BM"] == 64 and rec[0].grid == (132,)
    phases = rec[0].cost["phases"]
    assert len(phases) == 133 and all(p["items"] > 0 and p["trips"] > 0 for p in phases)
    assert all(p["flops"] > 0 for p in phases if not p["name"].startswith("reduce"))
    assert all(p["tail_bytes"] == 0 for p in phases)  # every epilogue is a RED phase's
    with _utils.record_launches() as rec:
        fused_rollout(w, z0, a, goal, config={"persistent": False})
    assert len(rec) == 67 and {r.meta["KIND"] for r in rec} == {0, 1, 2, 3, 4}
    # the same items (one launch per phase has no RED phases, so no MLP items per token either)
    with _utils.record_launches() as rec1:
        fused_rollout(w, z0, a, goal, config={"token_items": False})
    gemm = [p for p in rec1[0].cost["phases"] if not p["name"].startswith("reduce")]
    assert sum(r.ctas for r in rec) == sum(p["items"] for p in gemm)
    # tokens as items: the MLP phases of 3 query tokens (the sliding window's steps 3 and 4, but not the
    # last layer's, which runs the last token alone) have an item per (token, hidden split), with their
    # own splits: half of the others' 16, so that 5 row blocks x 3 tokens x 8 fit in one wave of 132
    cfg = rollout_config(w, 300, gpu=True, sms=132)
    assert (cfg.mlp_splits, cfg.token_splits) == (16, 8)
    tok = {p["name"]: p["items"] for p in phases}
    three = {p["name"] for p in gemm if p["name"].startswith("mlp") and p["name"].endswith(("step3", "step4"))
             and " l5 " not in p["name"]}
    assert len(three) == 10 and all(tok[n] == 5 * 3 * 8 <= 132 for n in three)
    assert all(tok[p["name"]] == p["items"] for p in gemm if p["name"] not in three)
    assert all(r.cost["phases"][0]["tail_bytes"] > 0 for r in rec if r.meta["KIND"] >= 2)


def test_too_many_candidates_for_int32_offsets_is_refused(tiny):
    m = lewm.LeWM(lewm.preset("pusht")).eval()
    w = pack_predictor(m).to(device="meta")
    with pytest.raises(ValueError, match="int32 offsets"):
        RolloutWorkspace(w, 200_000, 1, 5)


# -- GPU ------------------------------------------------------------------------------------------


def _pusht_model(seed=0):
    torch.manual_seed(seed)
    m = lewm.LeWM(lewm.preset("pusht")).eval()
    with torch.no_grad():
        for b in m.predictor.blocks:
            torch.nn.init.normal_(b.adaLN_modulation[1].weight, std=0.02)
            torch.nn.init.normal_(b.adaLN_modulation[1].bias, std=0.02)
    return m


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,C,H", [(300, 1, 5), (37, 2, 4), (1, 1, 5)])
def test_gpu_fused_vs_float64(dtype, N, C, H):
    """Flash-attention rule at the default size: |kernel - ref64| <= 2 |eager(dtype) - ref64| + atol."""
    dev = torch.device("cuda")
    m = _pusht_model().to(dev)
    z0, a, goal = (t.to(dev) for t in inputs(m, N, C, H))
    m64 = _pusht_model().double().to(dev)
    ref_p, ref_c = model_rollout(m64, z0.double(), a.double(), goal.double())
    me = _pusht_model().to(dev, dtype)
    eager_p, eager_c = model_rollout(me, z0.to(dtype), a.to(dtype), goal.to(dtype))
    w = pack_predictor(m, dtype=dtype)
    p, c = fused_rollout(w, z0, a, goal)
    torch.cuda.synchronize()
    atol = 1e-5 if dtype == torch.float32 else 1e-2
    err_k = (p.double() - ref_p).abs().max().item()
    err_e = (eager_p.double() - ref_p).abs().max().item()
    assert err_k <= 2 * err_e + atol, (err_k, err_e)
    cerr_k = ((c.double() - ref_c).abs() / ref_c.abs()).max().item()
    cerr_e = ((eager_c.double() - ref_c).abs() / ref_c.abs()).max().item()
    assert cerr_k <= 2 * cerr_e + atol, (cerr_k, cerr_e)
    # the PyTorch KV-cache reference on the GPU, same rule
    pr, cr = rollout_reference(w, z0, a, goal)
    assert (pr.double() - ref_p).abs().max().item() <= 2 * err_e + atol


@pytest.mark.gpu
def test_gpu_fused_rollout_in_cuda_graph():
    dev = torch.device("cuda")
    m = _pusht_model().to(dev)
    w = pack_predictor(m)
    z0, a, goal = (t.to(dev) for t in inputs(m, 300, 1, 5))
    ws = RolloutWorkspace(w, 300, 1, 5)
    want = [t.clone() for t in fused_rollout(w, z0, a, goal, workspace=ws)]
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fused_rollout(w, z0, a, goal, workspace=ws)
    a.copy_(torch.randn_like(a))
    g.replay()
    want2 = [t.clone() for t in model_rollout(m, z0, a, goal)]
    torch.testing.assert_close(out[0], want2[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1], want2[1], atol=1e-3, rtol=1e-4)
    assert not torch.equal(out[1], want[1])
