"""Replay a fixed-shape piece of work (a forward, a forward + backward) from a CUDA graph.

A ViT-S step is thousands of small kernel launches, and the host time of each (Python,
autograd, dispatch, launch) exceeds its GPU time: the GPU waits on the CPU. A CUDA graph
records the launches once and replays them with one call.

    step = CapturedCall(lambda: model(static_images))   # reads its inputs from static tensors
    static_images.copy_(batch)
    out = step()                                           # warm-up, capture, then replays

Rules of the game (those of torch.cuda.graph): the callable reads its inputs from tensors that
stay allocated (copy new data into them), its shapes and Python control flow do not change
between calls, and it does not synchronise with the host. Parameters updated in place (an
optimizer step outside the graph) are read by the next replay.
"""
from typing import Callable, Iterable, List, Optional, Tuple

import torch
from torch import nn


class CaptureError(RuntimeError):
    """Recording the CUDA graph failed (an operation that cannot be captured, a host sync, ...)."""


def on_side_stream(fn: Callable):
    """fn() on a fresh stream that waits for the current one, which then waits for it (warm-up before a capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = fn()
    torch.cuda.current_stream().wait_stream(side)
    return out


def release_generator_from_capture() -> None:
    """Return the default CUDA generator to eager use after a capture that failed.

    A capture registers the generator, and only a successful end of capture releases it: after a
    failed one, every later random draw outside a graph (dropout, drop path) would raise "Offset
    increment outside graph capture". A copy of its state (same seed and offset) is not registered
    with any graph.
    """
    generator = torch.cuda.default_generators[torch.cuda.current_device()]
    if hasattr(generator, "graphsafe_set_state"):  # torch >= 2.4
        generator.graphsafe_set_state(generator.clone_state())


class CapturedCall:
    """fn() run eagerly ``warmup_steps`` (at least 1) times (on a side stream: lazy initialisation,
    kernel tuning, torch.compile), then captured into a CUDA graph and replayed on every later call.

    Returns fn's output; after the capture that is the graph's own output, overwritten by the next
    replay (clone what you keep). A capture that fails raises CaptureError (later calls try again).
    ``grad_params``: parameters whose gradients fn computes
    (fn sets them to None first, e.g. with ``optimizer.zero_grad(set_to_none=True)``); the graph owns
    those gradient tensors, and they are attached to ``.grad`` again after each replay, so code that
    drops a gradient between steps (a frozen layer, ``zero_grad``) does not detach it for good.
    """

    def __init__(self, fn: Callable, *, warmup_steps: int = 2, grad_params: Iterable[nn.Parameter] = ()):
        if warmup_steps < 1:
            # cuBLAS, cuDNN and Triton initialise lazily on their first call, which a capture cannot record.
            raise ValueError(f"warmup_steps must be at least 1 (got {warmup_steps}): the first call initialises "
                             "libraries lazily, which a CUDA graph capture cannot record")
        if not torch.cuda.is_available():
            raise RuntimeError("CapturedCall records CUDA graphs and needs a CUDA device; call fn() directly instead")
        self.fn = fn
        self.warmup_steps = warmup_steps
        self._params = list(grad_params)
        self._eager_calls = 0
        self._graph: Optional[torch.cuda.CUDAGraph] = None
        self._out = None
        self._grads: List[Tuple[nn.Parameter, torch.Tensor]] = []

    @property
    def captured(self) -> bool:
        return self._graph is not None

    def __call__(self):
        if self._graph is None and self._eager_calls < self.warmup_steps:
            self._eager_calls += 1
            return on_side_stream(self.fn)
        if self._graph is None:
            self._capture()
        self._graph.replay()
        for param, grad in self._grads:
            param.grad = grad
        return self._out

    def _capture(self) -> None:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the warm-up's cached blocks, so the graph's own pool can have that memory
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._out = self.fn()
        except Exception as exc:
            release_generator_from_capture()
            raise CaptureError(f"CUDA graph capture failed: {type(exc).__name__}: {exc}") from exc
        self._graph = graph
        self._grads = [(p, p.grad) for p in self._params if p.grad is not None]


__all__ = ["CaptureError", "CapturedCall", "on_side_stream", "release_generator_from_capture"]
