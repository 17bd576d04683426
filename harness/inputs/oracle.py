"""The independent ground truth: Hugging Face `transformers` on the same checkpoint.

`oracle_score` (what the judge uses) scores the engine's own sequences: one teacher-forced forward per
batch of requests gives transformers' top-k logprobs at every step and, for MoE models, its routing of
every fed token, all on the engine's prefix, so every step is compared. `oracle_generate` decodes
greedily, step by step: transformers' own sequences, for tests of the engine against them.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from reference_runner.engine.args import EngineArgs
from reference_runner.records import Generation, Request

SCORE_BATCH = 8  # requests per teacher-forced forward


def oracle_generate(
    checkpoint: Path, requests: list[Request], *, top_k: int = EngineArgs.top_k, dtype: torch.dtype = torch.float32
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


@torch.inference_mode()
def oracle_score(checkpoint: Path, requests: list[Request], generations: list[Generation], *, top_k: int = EngineArgs.top_k,
                 dtype: torch.dtype = torch.float32) -> list[Generation]:
    """Transformers' distributions along each generation's own tokens: per step, the top-k logprobs of
    transformers' logits for the next token after the engine's prefix (`forced_from=0`: the tokens are the
    engine's, the choices transformers'), and for MoE models its routing of every fed position.

    A generation with an error, or without exactly `max_new_tokens` tokens, is not scored (empty record):
    its verdict is decided by the comparison of the records alone.
    """
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).eval()
    experts_per_tok = getattr(model.config, "num_experts_per_tok", None)
    scored = {g.rid: Generation(g.rid, forced_from=0) for g in generations}
    by_rid = {g.rid: g for g in generations}
    todo = [(r, by_rid[r.rid]) for r in requests
            if r.rid in by_rid and by_rid[r.rid].error is None and len(by_rid[r.rid].output_ids) == r.max_new_tokens]
    for start in range(0, len(todo), SCORE_BATCH):
        batch = todo[start:start + SCORE_BATCH]
        sequences = [r.prompt_ids + g.output_ids[:-1] for r, g in batch]  # every position the engine fed
        width = max(map(len, sequences))
        # Right padding: under the causal mask no real position attends to a pad, and positions stay 0..n-1.
        input_ids = torch.tensor([s + [0] * (width - len(s)) for s in sequences])
        attention_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
        moe = {"output_router_logits": True} if experts_per_tok else {}
        out = model(input_ids, attention_mask=attention_mask, **moe)
        top = torch.log_softmax(out.logits.float(), dim=-1).topk(top_k, dim=-1)
        ids, logprobs = top.indices.tolist(), top.values.tolist()
        routing = _routing(out.router_logits, len(batch), width, experts_per_tok) if experts_per_tok else None
        for row, (r, g) in enumerate(batch):
            s = scored[g.rid]
            prompt_len = len(r.prompt_ids)
            for step, token in enumerate(g.output_ids):
                position = prompt_len - 1 + step  # its logits predict the token of `step`
                s.append(token, list(zip(ids[row][position], logprobs[row][position])), in_graph=False)
            if routing is not None:
                experts, gaps = routing[0][row], routing[1][row]
                fed = [range(prompt_len)] + [[prompt_len + step - 1] for step in range(1, len(g.output_ids))]
                s.routed_experts = [[experts[p] for p in positions] for positions in fed]
                s.router_gaps = [[gaps[p] for p in positions] for positions in fed]
    return [scored[g.rid] for g in generations]


def _routing(router_logits: tuple[torch.Tensor, ...], batch: int, width: int, top_k: int) -> tuple[list, list]:
    """Per sequence, position and MoE layer: the top-k expert ids as transformers picks them (float32 softmax,
    then top-k), and the logit gap between the k-th and (k+1)-th expert."""
    logits = torch.stack([layer.reshape(batch, width, -1) for layer in router_logits], dim=2).float()  # [B, S, L, E]
    experts = torch.softmax(logits, dim=-1).topk(top_k, dim=-1).indices
    if logits.shape[-1] > top_k:
        values = logits.topk(top_k + 1, dim=-1).values
        gaps = values[..., -2] - values[..., -1]
    else:
        gaps = torch.full(logits.shape[:-1], float("inf"))
    return experts.tolist(), gaps.tolist()
