"""Router near-ties of a MoE checkpoint along token sequences.

Two correct kernels in a reduced precision round a router's logits differently; where the logit of a
token's k-th expert is within that noise of the next one's, they may pick different experts, and
every later step of the sequence then computes something else: not a bug, and not bounded by any
per-token tolerance. `router_gaps` finds those positions, in float32 on the CPU, so that a verdict
can stop there as it stops at a near-tie of the output.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from reference_runner.engine import Engine
from reference_runner.models.moe import SparseMoeBlock
from reference_runner.records import Request

# Searched in float32 on the CPU: the tiny checkpoints and other small ones, not production models.
MAX_CHECKPOINT_BYTES = 1 << 30
_EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


def has_experts(checkpoint: str | Path) -> bool:
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    return any(config.get(key) for key in _EXPERT_COUNT_KEYS)


def searchable(checkpoint: str | Path) -> bool:
    """Whether `checkpoint` has MoE layers and is small enough to search for router near-ties here."""
    size = sum(f.stat().st_size for f in Path(checkpoint).glob("*.safetensors"))
    return has_experts(checkpoint) and size <= MAX_CHECKPOINT_BYTES


def moe_blocks(model: torch.nn.Module) -> list[SparseMoeBlock]:
    return [m for m in model.modules() if isinstance(m, SparseMoeBlock)]


def router_gaps(checkpoint: str | Path, sequences: list[list[int]]) -> list[list[float]]:
    """Per sequence and token position, the smallest gap over layers between the router logits of the
    k-th and the (k+1)-th expert (k = top_k); empty lists for a checkpoint without MoE layers."""
    max_context = max(len(s) for s in sequences) + 16
    engine = Engine(checkpoint, mode="eager", max_bs=1, max_context=max_context)
    blocks = moe_blocks(engine.model_runner.model)
    if not blocks:
        return [[] for _ in sequences]
    gaps: list[torch.Tensor] = []

    def record(block: SparseMoeBlock):
        def hook(module, args, router_logits: torch.Tensor) -> None:
            top = router_logits.float().topk(block.top_k + 1, dim=-1).values
            gaps.append(top[:, -2] - top[:, -1])
        return hook

    handles = [block.gate.register_forward_hook(record(block)) for block in blocks]
    try:
        result = []
        for i, sequence in enumerate(sequences):
            gaps.clear()
            engine.generate([Request(f"routing{i}", sequence, max_new_tokens=1)])  # one prefill: every position
            result.append(torch.stack(gaps).min(dim=0).values.tolist())
        return result
    finally:
        for handle in handles:
            handle.remove()
