"""The independent ground truth: Hugging Face `transformers` greedy decoding of the same checkpoint."""
from __future__ import annotations

import inspect
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from reference_runner.records import Generation, Request


def oracle_generate(
    checkpoint: Path, requests: list[Request], *, top_k: int = 5, dtype: torch.dtype = torch.float32
) -> list[Generation]:
    """Greedy-decode each request alone with transformers, recording top-k logprobs of the raw logits.

    Requests run one at a time so no padding can leak into the result, and exactly `max_new_tokens`
    tokens are produced (EOS does not stop decoding): the engine under test does the same.
    """
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).eval()
    # transformers 5.x renamed forward's `past_key_values` to `cache`; accept both releases.
    cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return [_greedy(model, cache_kwarg, request, top_k) for request in requests]


@torch.inference_mode()
def _greedy(model: torch.nn.Module, cache_kwarg: str, request: Request, top_k: int) -> Generation:
    generation = Generation(rid=request.rid)
    cache = DynamicCache()
    input_ids = torch.tensor([request.prompt_ids])
    for _ in range(request.max_new_tokens):
        logits = model(input_ids, use_cache=True, **{cache_kwarg: cache}).logits[0, -1]
        # Our own log_softmax of the raw logits: generate()'s scores would carry its logits processors.
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        top = torch.topk(logprobs, top_k)
        token = int(top.indices[0])
        generation.append(token, list(zip(top.indices.tolist(), top.values.tolist())), in_graph=False)
        input_ids = torch.tensor([[token]])  # the cache, filled in place, holds every earlier position
    return generation

