"""The predictor: an AdaLN-zero causal transformer over frames, conditioned on actions.

One token per frame. Token t is modulated (shift, scale, gate; DiT-style AdaLN-zero) by the embedding
of action t only, and attends causally to tokens <= t. Two reference details are kept on purpose so
weights stay compatible (shared/spec/reference.md section 2):

* the positional embedding is learned and initialised with std 1 (`torch.randn`);
* each branch normalises twice: LayerNorm without affine (eps 1e-6) -> modulate -> the sublayer's own
  affine LayerNorm -> attention or MLP.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class Attention(nn.Module):
    """LN(affine) -> qkv (no bias) -> causal SDPA over time -> out proj + dropout."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.dropout = dropout
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D)
        B, T, _ = x.shape
        q, k, v = self.to_qkv(self.norm(x)).chunk(3, dim=-1)
        q, k, v = (t.view(B, T, self.heads, -1).transpose(1, 2) for t in (q, k, v))  # (B, h, T, dh)
        o = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.to_out(o.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """LN(affine) -> Linear -> GELU -> Dropout -> Linear -> Dropout."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(hidden, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConditionalBlock(nn.Module):
    """x += gate_a * Attn(modulate(LN(x))); x += gate_m * MLP(modulate(LN(x))), (shift, scale, gate)
    from SiLU -> Linear(c), zero-initialised so every block starts as the identity."""

    def __init__(self, dim: int, heads: int, dim_head: int, mlp: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, dim_head, dropout)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = FeedForward(dim, mlp, dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_a * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        x = x + gate_m * self.mlp(modulate(self.norm2(x), shift_m, scale_m))
        return x


class Predictor(nn.Module):
    """(B, T, D) frame latents + (B, T, D) action embeddings -> (B, T, D), T <= history.

    Output t predicts the latent of frame t+1 (before `pred_proj`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D = cfg.embed_dim
        self.history = cfg.history
        self.pos_embedding = nn.Parameter(torch.randn(1, cfg.history, D))
        self.blocks = nn.ModuleList(
            ConditionalBlock(D, cfg.pred_heads, cfg.pred_dim_head, cfg.pred_mlp, cfg.pred_dropout)
            for _ in range(cfg.pred_depth))
        self.norm = nn.LayerNorm(D)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        if T > self.history:
            raise ValueError(f"predictor window has {T} frames but model.history is {self.history}")
        x = x + self.pos_embedding[:, :T]
        for blk in self.blocks:
            x = blk(x, c)
        return self.norm(x)


class ActionEncoder(nn.Module):
    """(B, T, frameskip*action_dim) macro actions -> (B, T, D).

    Conv1d(kernel 1) to a small smoothed width, then Linear -> SiLU -> Linear."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.patch_embed = nn.Conv1d(cfg.action_input_dim, cfg.smoothed_dim, kernel_size=1)
        self.embed = nn.Sequential(
            nn.Linear(cfg.smoothed_dim, cfg.action_hidden), nn.SiLU(), nn.Linear(cfg.action_hidden, cfg.embed_dim))

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        a = self.patch_embed(a.transpose(1, 2)).transpose(1, 2)
        return self.embed(a)
