"""A DINO-WM-cost world model and CEM planner, for timing only (random weights: the cost, not the
quality, is compared).

What DINO-WM (Zhou et al. 2024, github.com/gaoyuezhou/dino_wm) computes when it plans, and what this
file reproduces op for op in cost:

Encoder  DINOv2 ViT-S/14 (frozen), frames resized 224 -> 196 px (its `encoder_transform`), the 196
         patch tokens x 384 of `x_norm_patchtokens` kept (14 x 14 patches, no pooling). Here: timm's
         `vit_small_patch14_dinov2` at img_size=196 (12 blocks, 6 heads, LayerScale, 21.6M params).
Inputs   proprio (4-d for PushT) -> Conv1d(k=1) -> 10-d, action (frameskip 5 x 2 = 10-d) -> Conv1d(k=1)
         -> 10-d (models/proprio.py `ProprioceptiveEmbedding`), both tiled over the 196 patches and
         concatenated per patch (`concat_dim: 1`): tokens of 384 + 10 + 10 = 404 dims.
Predictor  `models/vit.py::ViTPredictor`: learned positional embedding over num_hist x 196 tokens,
         6 pre-LN blocks (LN -> qkv no bias -> 16 heads x 64 -> explicit softmax(QK^T/8) with a
         frame-level causal mask (`generate_mask_matrix`: a patch sees every patch of its own and
         earlier frames) -> out Linear(1024, 404); LN -> Linear(404, 2048) -> GELU -> Linear(2048, 404)),
         final LayerNorm; attention as written there (matmul, masked_fill, softmax, matmul: the
         (B, 16, n, n) scores are materialised), dropout off (eval).
Rollout  `VWorldModel.rollout`: the context frame is ENCODED AGAIN for every candidate (the planner
         repeats obs_0 num_samples times and rollout() calls encode on the repeated batch), then 5
         predictor calls over windows of 1, 2, 3, 3, 3 frames (num_hist 3; no KV cache), each keeping
         the last frame's prediction and overwriting its action channels with the next action
         (`replace_actions_from_z`).
Cost     `objective_fn_last`: MSE over all 196 x 384 patch-token values of the last predicted frame vs
         the goal's, plus alpha (1) x MSE of the proprio channels.
CEM      `planning/cem.py`: per environment ONE AT A TIME (a Python loop over n_evals), mu = 0,
         sigma = var_scale; candidates mu + sigma * N(0, 1) with candidate 0 = mu; top-k by sorting the
         losses; mu, sigma = elites' mean and std; one `.item()` per environment and iteration (its
         loss log). Same samples / elites / iterations / horizon as our planners, same noise.

Simplified (no effect on the cost, or a small one, said where):
* random weights instead of DINOv2's and a trained predictor's (same shapes, same FLOPs);
* proprio is a constant zero state (DINO-WM feeds the measured one: same shapes);
* DINO-WM's per-iteration `evaluator.eval_actions` (simulating the plan in the environment every
  `eval_every` CEM steps, and wandb logging) is left out: that is environment time, not model time;
* the encoder is timm's DINOv2 ViT-S/14 (torch.hub's facebookresearch/dinov2 has the same blocks;
  it interpolates its 37 x 37 positional embedding to 14 x 14 on every call, which is skipped here);
* fp32 as DINO-WM plans (no autocast); PyTorch's defaults otherwise (no TF32), as for our planners.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DinoWMConfig:
    image_size: int = 224  # frames as the planner receives them (DINO-WM's img_size)
    enc_image_size: int = 196  # (224 // 16) * 14: what the ViT sees
    patch_size: int = 14
    enc_dim: int = 384
    enc_depth: int = 12
    enc_heads: int = 6
    action_input_dim: int = 10  # frameskip 5 x action_dim 2
    proprio_dim: int = 4  # PushT: agent position + velocity
    action_emb_dim: int = 10
    proprio_emb_dim: int = 10
    history: int = 3  # num_hist
    pred_depth: int = 6
    pred_heads: int = 16
    pred_dim_head: int = 64
    pred_mlp: int = 2048
    alpha: float = 1.0  # proprio weight of the planning objective

    @property
    def num_patches(self) -> int:
        return (self.enc_image_size // self.patch_size) ** 2

    @property
    def token_dim(self) -> int:
        return self.enc_dim + self.action_emb_dim + self.proprio_emb_dim

    @classmethod
    def tiny(cls, image_size: int = 32, action_input_dim: int = 10) -> "DinoWMConfig":
        """A toy size for smoke tests (same code, small numbers)."""
        return cls(image_size=image_size, enc_image_size=28, patch_size=7, enc_dim=32, enc_depth=2, enc_heads=2,
                   action_input_dim=action_input_dim, pred_depth=2, pred_heads=2, pred_dim_head=16, pred_mlp=64)

    @classmethod
    def for_lewm(cls, lewm_cfg, full: bool = True) -> "DinoWMConfig":
        """DINO-WM's full size with the action width of a LeWM config (frameskip * action_dim), or the
        toy size at that config's image size."""
        m = lewm_cfg.model
        if full:
            return cls(action_input_dim=m.action_input_dim)
        return cls.tiny(image_size=m.image_size, action_input_dim=m.action_input_dim)


def generate_mask_matrix(npatch: int, nwindow: int) -> torch.Tensor:
    """(1, 1, nwindow*npatch, nwindow*npatch) frame-level causal mask: 1 where a token of frame i may
    attend to a token of frame j <= i (DINO-WM's models/vit.py)."""
    frames = torch.arange(nwindow).repeat_interleave(npatch)
    return (frames[None, :] <= frames[:, None]).float()[None, None]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, mask: torch.Tensor):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.scale = heads, dim_head ** -0.5
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Linear(inner, dim)
        self.register_buffer("bias", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, n, dim)
        B, n, _ = x.shape
        q, k, v = self.to_qkv(self.norm(x)).chunk(3, dim=-1)
        q, k, v = (t.reshape(B, n, self.heads, -1).transpose(1, 2) for t in (q, k, v))  # (B, h, n, dh)
        dots = torch.matmul(q, k.transpose(-1, -2)) * self.scale  # (B, h, n, n): materialised, as DINO-WM
        dots = dots.masked_fill(self.bias[:, :, :n, :n] == 0, float("-inf"))
        attn = dots.softmax(dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(B, n, -1)
        return self.to_out(out)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        return self.net(x)


class ViTPredictor(nn.Module):
    """(B, T*P, d) tokens of T <= history frames -> (B, T*P, d)."""

    def __init__(self, cfg: DinoWMConfig):
        super().__init__()
        d, P, W = cfg.token_dim, cfg.num_patches, cfg.history
        self.pos_embedding = nn.Parameter(torch.randn(1, W * P, d))
        mask = generate_mask_matrix(P, W)
        self.layers = nn.ModuleList(
            nn.ModuleList([Attention(d, cfg.pred_heads, cfg.pred_dim_head, mask), FeedForward(d, cfg.pred_mlp)])
            for _ in range(cfg.pred_depth))
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        x = x + self.pos_embedding[:, :x.shape[1]]
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return self.norm(x)


class ConvEmbed(nn.Module):
    """(B, T, in) -> (B, T, out) via Conv1d(kernel 1), DINO-WM's ProprioceptiveEmbedding."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.patch_embed = nn.Conv1d(cin, cout, kernel_size=1)

    def forward(self, x):
        return self.patch_embed(x.transpose(1, 2)).transpose(1, 2)


def build_encoder(cfg: DinoWMConfig) -> nn.Module:
    """DINOv2 ViT-S/14 at cfg.enc_image_size (timm, random weights); any other dims: the same timm
    VisionTransformer family with those dims."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    if (cfg.enc_dim, cfg.enc_depth, cfg.enc_heads, cfg.patch_size) == (384, 12, 6, 14):
        return timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=cfg.enc_image_size,
                                 num_classes=0)
    return VisionTransformer(img_size=cfg.enc_image_size, patch_size=cfg.patch_size, embed_dim=cfg.enc_dim,
                             depth=cfg.enc_depth, num_heads=cfg.enc_heads, mlp_ratio=4.0, init_values=1e-5,
                             num_classes=0)


class DinoWM(nn.Module):
    """The world model (eval mode, fp32). Shapes: P patches, d = token_dim, A = action_input_dim."""

    def __init__(self, cfg: DinoWMConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or DinoWMConfig()
        self.encoder = build_encoder(cfg)
        self.action_encoder = ConvEmbed(cfg.action_input_dim, cfg.action_emb_dim)
        self.proprio_encoder = ConvEmbed(cfg.proprio_dim, cfg.proprio_emb_dim)
        self.predictor = ViTPredictor(cfg)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.eval()

    @property
    def device(self):
        return self.mean.device

    def transform_obs(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, H, W, 3) uint8 -> (N, 3, image_size, image_size) normalised (DINO-WM's preprocessor,
        applied once per plan to start and goal)."""
        x = pixels.to(self.device).permute(0, 3, 1, 2).float() / 255.0
        s = self.cfg.image_size
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        return (x - self.mean) / self.std

    def encode_obs(self, images: torch.Tensor, proprio: torch.Tensor):
        """images (B, T, 3, S, S), proprio (B, T, p) -> visual (B, T, P, 384), proprio emb (B, T, 10)."""
        B, T = images.shape[:2]
        x = images.reshape(B * T, *images.shape[2:])
        e = self.cfg.enc_image_size
        x = F.interpolate(x, size=(e, e), mode="bilinear", antialias=True, align_corners=False)  # Resize(196)
        tok = self.encoder.forward_features(x)[:, self.encoder.num_prefix_tokens:]  # x_norm_patchtokens
        return tok.reshape(B, T, *tok.shape[1:]), self.proprio_encoder(proprio)

    def encode(self, images, proprio, actions) -> torch.Tensor:
        """-> z (B, T, P, d): visual | proprio emb | action emb, tiled per patch (concat_dim 1)."""
        vis, pro = self.encode_obs(images, proprio)
        act = self.action_encoder(actions)
        P = vis.shape[2]
        return torch.cat([vis, pro[:, :, None].expand(-1, -1, P, -1), act[:, :, None].expand(-1, -1, P, -1)], dim=3)

    def predict(self, z: torch.Tensor) -> torch.Tensor:
        B, T, P, d = z.shape
        return self.predictor(z.reshape(B, T * P, d)).reshape(B, T, P, d)

    def replace_actions_from_z(self, z, actions):
        act = self.action_encoder(actions)  # (B, t, 10)
        z[..., -act.shape[-1]:] = act[:, :, None].expand(-1, -1, z.shape[2], -1)
        return z

    @torch.no_grad()
    def rollout(self, images, proprio, actions):
        """images (B, 1, 3, S, S), proprio (B, 1, p), actions (B, H, A) -> the predicted visual tokens
        (B, H+1, P, 384) and proprio channels (B, H+1, 10) of every frame (DINO-WM's rollout)."""
        n0 = images.shape[1]
        z = self.encode(images, proprio, actions[:, :n0])  # encodes the (repeated) context frames
        rest = actions[:, n0:]
        W = self.cfg.history
        for t in range(rest.shape[1]):
            z_new = self.predict(z[:, -W:])[:, -1:]
            z_new = self.replace_actions_from_z(z_new, rest[:, t:t + 1])
            z = torch.cat([z, z_new], dim=1)
        z_new = self.predict(z[:, -W:])[:, -1:]
        z = torch.cat([z, z_new], dim=1)
        D = self.cfg.enc_dim
        return z[..., :D], z[:, :, 0, D:D + self.cfg.proprio_emb_dim]

    def objective(self, vis_pred, pro_pred, vis_goal, pro_goal):
        """objective_fn_last: (B,) MSE of the last frame's patch tokens (+ alpha x proprio MSE)."""
        lv = (vis_pred[:, -1:] - vis_goal).pow(2).mean(dim=(1, 2, 3))
        lp = (pro_pred[:, -1:] - pro_goal).pow(2).mean(dim=(1, 2))
        return lv + self.cfg.alpha * lp


@dataclass
class DinoPlanResult:
    actions: torch.Tensor  # (E, H, A)
    cost: torch.Tensor  # (E,) the best elite's loss in the last iteration


class DinoWMPlanner:
    """CEM as DINO-WM's planning/cem.py (environments one at a time). `noise` (iterations, E, samples,
    horizon, A), the same tensor our planners take."""

    def __init__(self, model: DinoWM, samples: int = 300, elites: int = 30, iterations: int = 30,
                 horizon: int = 5, var_scale: float = 1.0):
        self.model, self.samples, self.elites = model, samples, elites
        self.iterations, self.horizon, self.var_scale = iterations, horizon, var_scale

    @torch.no_grad()
    def plan(self, start, goal, noise: torch.Tensor) -> DinoPlanResult:
        m, S, cfg = self.model, self.samples, self.model.cfg
        start = start[None] if start.dim() == 3 else start
        goal = goal[None] if goal.dim() == 3 else goal
        E = start.shape[0]
        noise = noise.to(m.device)
        obs0 = m.transform_obs(start)[:, None]  # (E, 1, 3, S, S): transform_obs once per plan
        obsg = m.transform_obs(goal)[:, None]
        prop0 = torch.zeros(E, 1, cfg.proprio_dim, device=m.device)
        vis_g, pro_g = m.encode_obs(obsg, prop0)  # the goal is encoded once per plan
        mu_all, cost_all, losses = [], [], []
        for e in range(E):  # DINO-WM: `for traj in range(n_evals)`
            mu = torch.zeros(self.horizon, cfg.action_input_dim, device=m.device)
            sigma = torch.full_like(mu, self.var_scale)
            best = None
            for it in range(self.iterations):
                # einops.repeat of obs_0 to num_samples: a real copy, encoded inside rollout()
                cur_obs = obs0[e:e + 1].repeat(S, 1, 1, 1, 1)
                cur_pro = prop0[e:e + 1].repeat(S, 1, 1)
                action = noise[it, e] * sigma + mu
                action[0] = mu
                vis, pro = m.rollout(cur_obs, cur_pro, action)
                loss = m.objective(vis, pro, vis_g[e:e + 1], pro_g[e:e + 1])
                topk_idx = torch.argsort(loss)[: self.elites]
                topk_action = action[topk_idx]
                losses.append(loss[topk_idx[0]].item())  # DINO-WM logs this every iteration: a host sync
                best = loss[topk_idx[0]]
                mu, sigma = topk_action.mean(dim=0), topk_action.std(dim=0)
            mu_all.append(mu)
            cost_all.append(best)
        return DinoPlanResult(torch.stack(mu_all), torch.stack(cost_all))


def param_counts(model: DinoWM) -> dict:
    n = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    return {"encoder": n(model.encoder), "predictor": n(model.predictor),
            "action_encoder": n(model.action_encoder), "proprio_encoder": n(model.proprio_encoder)}
