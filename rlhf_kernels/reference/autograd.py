"""Double backward: a backward written as differentiable torch ops.

The compiled ops' backward is a stored first derivative or a backward kernel, and the
reference log-prob ops recompute their gradient chunk by chunk from detached logits:
autograd cannot differentiate either, and a second derivative taken through them was a
silent 0 (or a wrong value where part of the graph survived). So when autograd records
the backward itself (torch.autograd.grad(..., create_graph=True): torch.is_grad_enabled()
inside a backward), every op's backward computes instead the vector-Jacobian product of
its outputs recomputed by the reference's torch formulas, as a graph: exact second
derivatives on every backend, at the reference's speed and memory (unchunked), only in
that mode.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch


def recording_backward() -> bool:
    """Whether the backward running now is itself being recorded (create_graph=True)."""
    return torch.is_grad_enabled()


def vjp(
    fn: Callable[..., object],
    inputs: Sequence[Optional[torch.Tensor]],
    needs: Sequence[bool],
    grad_outputs: Sequence[Optional[torch.Tensor]],
) -> list[Optional[torch.Tensor]]:
    """sum_k grad_outputs[k] . d fn(*inputs)[k] / d inputs[i] for each i with needs[i]
    (None elsewhere), differentiable with respect to the inputs and the grad_outputs.
    `fn` returns a tensor or a tuple of them; a grad_output of None skips its output."""
    wanted = [x for x, need in zip(inputs, needs) if need and x is not None]
    result: list[Optional[torch.Tensor]] = [None] * len(inputs)
    if not wanted:
        return result
    with torch.enable_grad():
        outputs = fn(*inputs)
        outputs = (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None and o.requires_grad]
        if pairs:
            grads = torch.autograd.grad(
                [o for o, _ in pairs], wanted, [g for _, g in pairs], create_graph=True, allow_unused=True
            )
        else:
            grads = (None,) * len(wanted)
    found = iter(grads)
    for i, (x, need) in enumerate(zip(inputs, needs)):
        if need and x is not None:
            grad = next(found)
            result[i] = torch.zeros_like(x) if grad is None else grad
    return result
