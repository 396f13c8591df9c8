"""The encoder: pixels -> one 192-d latent per frame.

ViT (timm) over the frame, the CLS token after the ViT's final LayerNorm, then a BatchNorm projector.
The projector matters: the paper notes that the final LayerNorm alone stops SIGReg from shaping the
distribution, so the latent z is the projector's output.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MLPProjector(nn.Module):
    """Linear(D, H) -> BatchNorm1d(H) -> GELU -> Linear(H, D), applied to (N, D) rows.

    BatchNorm normalises over every row it sees (B*T rows in training).
    """

    def __init__(self, dim: int, hidden: int, out: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        x = self.fc2(F.gelu(self.bn(self.fc1(x))))
        return x.reshape(*shape[:-1], x.shape[-1])


def hf_vit_init(vit: nn.Module, std: float = 0.02) -> nn.Module:
    """Initialise a timm ViT as Hugging Face's ViTModel initialises the reference's encoder
    (ViTPreTrainedModel._init_weights, initializer_range 0.02): every Linear and the patch-embedding
    Conv2d truncated-normal (std 0.02, cut at +-2 absolute) with zero bias, LayerNorms weight 1 and
    bias 0, the CLS token and the position embeddings truncated-normal std 0.02. (timm's own init
    gives the CLS token std 1e-6 and the patch embedding PyTorch's default Conv2d init.)"""
    with torch.no_grad():
        for m in vit.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, mean=0.0, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(vit.pos_embed, mean=0.0, std=std)
        nn.init.trunc_normal_(vit.cls_token, mean=0.0, std=std)
    return vit


def build_vit(cfg: ModelConfig) -> nn.Module:
    """A timm VisionTransformer with the reference's shape: pre-LN blocks, qkv bias, CLS token,
    learned positional embedding, final LayerNorm, no head; initialised as HF's ViT (hf_vit_init) or,
    with model.init "timm", as timm initialises it."""
    from timm.models.vision_transformer import VisionTransformer

    if cfg.image_size % cfg.patch_size != 0:
        raise ValueError(
            f"model.image_size ({cfg.image_size}) must be a multiple of model.patch_size ({cfg.patch_size})")
    if cfg.enc_width % cfg.enc_heads != 0:
        raise ValueError(f"model.enc_width ({cfg.enc_width}) must be divisible by model.enc_heads ({cfg.enc_heads})")
    vit = VisionTransformer(
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        in_chans=3,
        num_classes=0,
        global_pool="token",
        embed_dim=cfg.enc_width,
        depth=cfg.enc_depth,
        num_heads=cfg.enc_heads,
        mlp_ratio=cfg.enc_mlp_ratio,
        qkv_bias=True,
        class_token=True,
        norm_layer=partial(nn.LayerNorm, eps=cfg.enc_ln_eps),
    )
    return hf_vit_init(vit) if cfg.init == "hf" else vit


class Encoder(nn.Module):
    """(N, 3, H, W) normalised float images -> (N, D) latents (projector output)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.vit = build_vit(cfg)
        self.projector = MLPProjector(cfg.enc_width, cfg.proj_hidden, cfg.embed_dim)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, H, W, 3) uint8 (or float in [0, 1]) on any device -> (N, 3, S, S) normalised float.

        Runs on the tensor's device: move uint8 frames to the GPU first, then call this
        (4x fewer bytes over the bus than float)."""
        if pixels.dim() != 4 or pixels.shape[-1] != 3:
            raise ValueError(f"pixels must be (N, H, W, 3), got {tuple(pixels.shape)}")
        x = pixels.permute(0, 3, 1, 2)
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        s = self.cfg.image_size
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        return (x - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.vit.forward_features(images)  # (N, 1 + P, W), after the final LayerNorm
        return self.projector(tokens[:, 0])
