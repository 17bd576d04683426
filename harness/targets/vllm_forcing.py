"""Forcing tokens inside vLLM's decode loop: a V1 logits processor that makes a request choose given tokens from a
given step on, so that the judge can compare vLLM's steps past a near-tie (`Request.forced_from`, `forced_ids`).

vLLM's sampler computes the logprobs it returns before any logits processor runs (vllm/v1/sample/sampler.py,
`Sampler.forward`: `raw_logprobs` first, with `logprobs_mode="raw_logprobs"`), so a forced step still reports the
model's own distribution, computed by the same decode steps, batch and graphs; only the sampled token changes.
Imported in the worker only (it imports vllm); vLLM loads it by name (`LLM(logits_processors=[...])`), and each
request carries its forcing in `SamplingParams.extra_args[FORCED]`: the first forced step (`from`) and the tokens to
choose from there (`ids`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from harness.targets.vllm import FORCED

T = TypeVar("T")


@dataclass(frozen=True)
class Forcing:
    """A request's forced tokens and its running output (vLLM's own list: its length is the step being sampled)."""

    start: int
    ids: list[int]
    output: Sequence[int]

    def token(self) -> int | None:
        step = len(self.output)
        return self.ids[step - self.start] if self.start <= step < self.start + len(self.ids) else None


def follow_batch(rows: dict[int, T], batch_update: BatchUpdate | None,
                 state: Callable[[SamplingParams | None, Sequence[int]], T | None]) -> None:
    """Keep per-row state of vLLM's persistent batch in step with its changes: a removed row's dropped, an added row's
    made by `state(params, output)` (None: none), a moved row's moved with it."""
    if batch_update is None:
        return
    for index in batch_update.removed:
        rows.pop(index, None)
    for index, params, _, output in batch_update.added:
        value = state(params, output)
        if value is None:
            rows.pop(index, None)
        else:
            rows[index] = value
    for a, b, direction in batch_update.moved:  # a one-way move replaces b's entry; a swap exchanges them
        moving, replaced = rows.pop(a, None), rows.pop(b, None)
        if moving is not None:
            rows[b] = moving
        if direction == MoveDirectionality.SWAP and replaced is not None:
            rows[a] = replaced


class ForceTokens(LogitsProcessor):
    """Each forced request's row of logits becomes -inf but at its forced token, on the steps it is forced."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.forcings: dict[int, Forcing] = {}  # by the request's row in the persistent batch

    def is_argmax_invariant(self) -> bool:
        return False  # it decides the greedy choice: vLLM must apply it on the greedy path too

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        def forcing(params: SamplingParams | None, output: Sequence[int]) -> Forcing | None:
            forced = (params.extra_args or {}).get(FORCED) if params is not None else None
            return Forcing(forced["from"], list(forced["ids"]), output) if forced else None

        follow_batch(self.forcings, batch_update, forcing)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, forcing in self.forcings.items():
            token = forcing.token()
            if token is not None:
                logits[index].fill_(float("-inf"))
                logits[index, token] = 0.0
        return logits
