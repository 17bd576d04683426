"""Where a captured decode step may be cut: a mark the model code records at each decoder-layer boundary.

Compiled mode (`sim/piecewise.py`) cuts the captured program at these marks, so that identical decoder
layers become identical pieces that compile once, as vLLM cuts its graph at attention and compiles each
distinct piece once. Outside a capture (eager code, a torch.compile trace) a mark is the identity and
costs one check.
"""
from __future__ import annotations

import torch
from torch.overrides import handle_torch_function, has_torch_function


def layer_boundary(hidden: torch.Tensor) -> torch.Tensor:
    """`hidden` as is; a graph capture records the call, before each decoder layer and after the last."""
    if not torch.compiler.is_compiling() and has_torch_function((hidden,)):
        return handle_torch_function(layer_boundary, (hidden,), hidden)
    return hidden
