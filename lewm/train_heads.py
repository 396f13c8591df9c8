"""What `lewm idm` and `lewm reach` share: training a small head on frozen embeddings of a data set's
frames (the flags' checks, encoding each frame once, the AdamW + cosine loop with a progress bar)."""
from __future__ import annotations

import numpy as np
import torch

from .errors import UserError
from .evals.common import encode_rows


def check_args(lr: float, **positive: int) -> None:
    """Each keyword (a flag's name, `_` for `-`) a positive integer, `lr` positive; UserError naming the flag."""
    for name, v in positive.items():
        if not isinstance(v, int) or v <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
    if not lr > 0:
        raise UserError(f"--lr must be positive, got {lr}")


def embed_rows(model, path, *row_sets, progress: bool = False) -> list[torch.Tensor]:
    """Frozen embeddings (on the model's device) of the frames at each array of rows, every distinct row
    encoded once."""
    rows = np.unique(np.concatenate([np.asarray(r, dtype=np.int64) for r in row_sets]))
    z = torch.from_numpy(encode_rows(model, path, rows, progress=progress, desc="encode"))
    z = z.to(model.action_mean.device)
    return [z[torch.from_numpy(np.searchsorted(rows, r))] for r in row_sets]


def fit_head(head: torch.nn.Module, batch_loss, n: int, *, steps: int, batch_size: int, lr: float, seed: int,
             progress: bool, desc: str) -> torch.nn.Module:
    """`steps` AdamW steps (weight decay 1e-4, cosine to 0) of `batch_loss(indices)` over `n` examples, the
    batches drawn with a generator seeded with `seed`; returns the head in eval mode."""
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    dev = next(head.parameters()).device
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc=desc, unit="step", leave=False)
    head.train()
    for _ in range(steps):
        loss = batch_loss(torch.randint(0, n, (batch_size,), generator=g).to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return head.eval()


def add_training_args(p) -> None:
    """The flags both head commands take after their own: --steps ... --no-progress."""
    p.add_argument("--steps", type=int, default=3000, help="AdamW steps (3000)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden", type=int, default=256, help="MLP width (256)")
    p.add_argument("--depth", type=int, default=2, help="hidden layers (2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true")
