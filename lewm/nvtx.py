"""NVTX ranges for profiles (encode / predict / loss / backward / optimizer / plan phases).

`nvtx_range(name)` is a no-op without CUDA (torch.cuda.nvtx raises there) and while torch.compile
traces (a range inside a compiled region would break the graph); in eager CUDA runs it opens a range
that Nsight Systems and torch.profiler show.
"""
from __future__ import annotations

import contextlib

import torch


def nvtx_range(name: str):
    if torch.cuda.is_available() and not torch.compiler.is_compiling():
        return torch.cuda.nvtx.range(name)
    return contextlib.nullcontext()
