"""Router near-ties of a MoE checkpoint along token sequences, for engines that do not report their routing.

Two correct kernels in a reduced precision round a router's logits differently; where the logit of a
token's k-th expert is within that noise of the next one's, they may pick different experts, and
every later step of the sequence then computes something else: not a bug, and not bounded by any
per-token tolerance. An engine that reports its routers' choices (the reference runner) is compared
expert by expert and continued with the baseline's experts replayed (`compare.py`); for one that does
not (SGLang), `router_gaps` finds those positions with transformers (the independent oracle), in float32
on the CPU, so that a verdict can stop there as it stops at a near-tie of the output.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from reference_runner.models.loader import read_config

# Searched in float32 on the CPU: the tiny checkpoints and other small ones, not production models.
MAX_CHECKPOINT_BYTES = 1 << 30
_EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


@dataclass(frozen=True)
class RoutingTie:
    """The first token position of a request whose MoE routing two kernels may settle differently.

    Every step from `step` on reads that token's hidden state (through the KV cache), so a divergence
    from there is float noise amplified by a discrete choice, and comparison stops at it as at a near-tie.
    """

    position: int  # in prompt + output
    gap: float  # the router logit gap between the k-th and the (k+1)-th expert there
    step: int  # the first decode step whose logits depend on that position


def first_routing_tie(gaps: list[float], prompt_len: int, router_gap: float) -> RoutingTie | None:
    """The earliest position whose router gap is below `router_gap`, or None."""
    for position, gap in enumerate(gaps):
        if gap < router_gap:
            return RoutingTie(position, gap, max(0, position - prompt_len + 1))
    return None


def has_experts(checkpoint: str | Path) -> bool:
    hf = read_config(checkpoint).hf
    return any(hf.get(key) for key in _EXPERT_COUNT_KEYS)


def searchable(checkpoint: str | Path) -> bool:
    """Whether `checkpoint` has MoE layers and is small enough to search for router near-ties here."""
    size = sum(f.stat().st_size for f in Path(checkpoint).glob("*.safetensors"))
    return has_experts(checkpoint) and size <= MAX_CHECKPOINT_BYTES


@torch.inference_mode()
def router_gaps(checkpoint: str | Path, sequences: list[list[int]]) -> list[list[float]]:
    """Per sequence and token position, the smallest gap over MoE layers between the router logits of the
    k-th and the (k+1)-th expert (k = top_k); empty lists for a checkpoint without MoE layers."""
    if not has_experts(checkpoint):
        return [[] for _ in sequences]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    top_k = model.config.num_experts_per_tok
    result = []
    for sequence in sequences:
        layers = model(torch.tensor([sequence]), output_router_logits=True).router_logits
        top = torch.stack([logits.reshape(len(sequence), -1) for logits in layers]).float().topk(top_k + 1, dim=-1).values
        result.append((top[..., -2] - top[..., -1]).min(dim=0).values.tolist())
    return result
