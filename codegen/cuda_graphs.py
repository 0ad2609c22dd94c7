"""CUDA graph capture for flashc: every graph owns the cuBLAS workspace it replays with.

PyTorch gives cuBLAS (and cuBLASLt) one persistent workspace per (handle, stream), made
on the first matmul on that stream and kept in a map (ATen's ``CublasHandlePool.cpp``).
A capture records the workspace's address. ``torch.cuda.graph`` captures all run on one
shared side stream, so without care every graph of the process replays with the
workspace that the *first* capture there allocated, inside that first graph's private
memory pool. flashc's first captures are the tuner's throwaway graphs
(``tuning.cuda_graph_bench``, whose library candidates call cuBLAS), so a decode step
tuned in the same process was captured around memory of a pool that no live graph
holds. Whoever calls ``torch._C._cuda_clearCublasWorkspaces()`` then frees it (Inductor's
CUDA graph trees do, around every warm-up and recording, e.g. inside Hugging Face's
``generate`` with a static cache, which compiles with ``mode="reduce-overhead"``); the
next ``empty_cache`` returns it to the driver and the step's next replay faults
(``unspecified launch failure``; issue "Soundness"). With a warm tuning cache the step's
own capture came first and owned the workspace, which is why only cold runs crashed.

The rule is Inductor's (``torch/_inductor/cudagraph_trees.py``, ``clear_cublas_manager``):
drop the map before a capture, so the capture allocates its workspace in its own private
pool (kept until the graph is destroyed, whoever clears the map later), and after it, so
no later work on that stream shares the graph's workspace.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["capture", "release_library_workspaces"]


def release_library_workspaces() -> None:
    """Drop PyTorch's cached cuBLAS/cuBLASLt workspaces (the next matmul on a stream allocates one)."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)  # absent from CPU-only builds
    if clear is not None:
        clear()


@contextlib.contextmanager
def capture(graph: "torch.cuda.CUDAGraph", stream: "torch.cuda.Stream | None" = None) -> Iterator[None]:
    """``torch.cuda.graph(graph, stream=stream)``, with a cuBLAS workspace of the graph's own.

    Work captured inside owns every buffer it allocates through PyTorch (the graph's
    private pool); tensors made outside must be kept alive by the caller as long as
    the graph is replayed.
    """
    release_library_workspaces()
    try:
        with torch.cuda.graph(graph, stream=stream):
            yield
    finally:
        release_library_workspaces()
