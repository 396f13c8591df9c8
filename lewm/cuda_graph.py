"""The whole training step (forward, backward, clipping, AdamW) captured once in a CUDA graph and
replayed: `lewm train --cuda-graphs`. The eager step in lewm/train.py stays the reference.

    step = GraphedStep(body, opt, device)     # body(static) -> dict of output tensors
    out = step(pixels=..., actions=..., directions=..., lr=1e-3)

Capture needs a few warm-up steps on a side stream first; they change the weights, the AdamW state and
the RNG, so `snapshot` is taken before and `restore` writes it back in place (the graph holds the
tensors' addresses): the first replayed step is the step the eager path would take.
"""
from __future__ import annotations

import torch

WARMUP_STEPS = 3


def snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer, device: torch.device) -> dict:
    """Weights, buffers, optimizer state and the RNG states, copied."""
    snap = {"model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "opt": {p: {k: v.clone() for k, v in st.items() if torch.is_tensor(v)} for p, st in opt.state.items()},
            "cpu_rng": torch.get_rng_state()}
    if device.type == "cuda":
        snap["cuda_rng"] = torch.cuda.get_rng_state(device)
    return snap


@torch.no_grad()
def restore(model: torch.nn.Module, opt: torch.optim.Optimizer, snap: dict, device: torch.device) -> None:
    """Write `snap` back into the same tensors (in place)."""
    for k, v in model.state_dict().items():
        v.copy_(snap["model"][k])
    for p, st in opt.state.items():
        old = snap["opt"].get(p, {})
        for k, v in st.items():
            if torch.is_tensor(v):
                # state the warm-up created (AdamW's moments and step before its first step): zeros,
                # which is what a first AdamW step starts from
                v.copy_(old[k]) if k in old else v.zero_()
    torch.set_rng_state(snap["cpu_rng"])
    if "cuda_rng" in snap:
        torch.cuda.set_rng_state(snap["cuda_rng"], device)


class GraphedStep:
    """`body(static)` captured at the first call, replayed after. Inputs are copied into static
    buffers (tensors) or filled into zero-dim ones (numbers, such as the learning rate, which the
    optimizer then reads from a tensor: its param groups' lr becomes a device tensor at capture)."""

    def __init__(self, body, model: torch.nn.Module, opt: torch.optim.Optimizer, device: torch.device):
        self.body, self.model, self.opt, self.device = body, model, opt, device
        self.graph = None
        self.static: dict = {}
        self.out: dict = {}

    def __call__(self, **inputs) -> dict:
        if self.graph is None:
            self._capture(inputs)
        for k, v in inputs.items():
            if torch.is_tensor(v):
                self.static[k].copy_(v)
            else:
                self.static[k].fill_(v)
        self.graph.replay()
        return self.out

    def _capture(self, inputs: dict) -> None:
        for g in self.opt.param_groups:
            g["lr"] = torch.tensor(float(g["lr"]), device=self.device)
        self.static = {k: v.clone() if torch.is_tensor(v) else torch.tensor(float(v), device=self.device)
                       for k, v in inputs.items()}
        snap = snapshot(self.model, self.opt, self.device)
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            for _ in range(WARMUP_STEPS):
                self.body(self.static)
        torch.cuda.current_stream(self.device).wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        # "thread_local": the DataLoader's pin-memory thread keeps allocating pinned host memory while
        # we capture; in the default "global" mode any such call from another thread breaks the capture
        with torch.cuda.graph(self.graph, stream=s, capture_error_mode="thread_local"):
            self.out = self.body(self.static)
        restore(self.model, self.opt, snap, self.device)
