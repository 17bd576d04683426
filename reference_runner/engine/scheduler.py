"""Scheduler: which requests prefill and which decode at each step.

Requests are admitted in arrival order once their `arrival_step` has come and the KV cache can hold
them at their full length (prompt + `max_new_tokens`), so a running request never runs out of blocks.
When no rank has anything running, the step count skips ahead to the next arrival.

Under DP every rank schedules its own requests, but all ranks keep one step count and run the same
forwards: each step they exchange what they are about to run, and a rank without work of a kind
that another rank runs takes part with an idle, padded forward (`ScheduledBatch.idle`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from reference_runner.engine.kv_cache import KVCache
from reference_runner.parallel.collectives import dp_gather_host
from reference_runner.parallel.state import ParallelState
from reference_runner.records import Generation, Request


@dataclass
class Running:
    """A request admitted to the batch; `num_tokens` counts tokens already sampled on the device."""

    req: Request
    gen: Generation
    num_tokens: int = 0
    last_ids: torch.Tensor | None = None  # device tensor holding its newest token, at row `last_row`
    last_row: int = 0

    @property
    def seq_len(self) -> int:
        """KV length once the newest token has been fed."""
        return len(self.req.prompt_ids) + self.num_tokens

    @property
    def forced_token(self) -> int | None:
        """The token the request forces at its next step (`Request.forced_from`), or None: the engine's own choice."""
        req, step = self.req, self.num_tokens
        return None if req.forced_from is None or step < req.forced_from else req.forced_ids[step - req.forced_from]

    @property
    def finished(self) -> bool:
        return self.num_tokens == self.req.max_new_tokens


@dataclass
class ScheduledBatch:
    """This rank's requests for one forward, and every DP rank's size of it (one entry without DP):
    prompt tokens for a prefill, requests for a decode."""

    reqs: list[Running]
    global_sizes: list[int]

    @property
    def idle(self) -> bool:
        """This rank has nothing to run while another DP rank runs: it joins with a padded, empty batch."""
        return not self.reqs and any(self.global_sizes)


class Scheduler:
    """Admission by KV block budget, skipping idle steps, and the per-step agreement of DP ranks."""

    def __init__(self, requests: list[Running], kv_cache: KVCache, parallel: ParallelState, device: str) -> None:
        self.waiting = sorted(requests, key=lambda r: r.req.arrival_step)  # stable: ties keep request order
        self.running: list[Running] = []
        self.kv_cache = kv_cache
        self.parallel = parallel
        self.device = device
        self.capacity = kv_cache.allocator.num_free
        self.committed = 0  # blocks promised to running requests at their full length
        self.step = 0

    def next_prefill(self, results_pending: bool) -> ScheduledBatch | None:
        """Start the next step: the requests admitted to it (prefilled first), or None once no DP rank has
        anything left to run or to read."""
        busy = bool(self.waiting or self.running or results_pending)
        next_step = self.waiting[0].req.arrival_step if self.waiting and not self.running else self.step
        busy_ranks, next_steps = dp_gather_host([busy, next_step], self.parallel, self.device)
        if not any(busy_ranks):
            return None
        self.step = max(self.step, min(n for n, b in zip(next_steps, busy_ranks) if b))
        admitted = []
        while self.waiting and self.waiting[0].req.arrival_step <= self.step and self._fits(self.waiting[0]):
            self.committed += self._blocks(self.waiting[0])
            admitted.append(self.waiting.pop(0))
        self.running += admitted
        (prefill_tokens,) = dp_gather_host([sum(len(r.req.prompt_ids) for r in admitted)], self.parallel, self.device)
        return ScheduledBatch(admitted, prefill_tokens)

    def next_decode(self) -> ScheduledBatch:
        """The step's decode batch, after its prefill: every running request that still needs tokens
        (a request just prefilled has its first one)."""
        decoding = [r for r in self.running if not r.finished]
        (decode_bs,) = dp_gather_host([len(decoding)], self.parallel, self.device)
        return ScheduledBatch(decoding, decode_bs)

    def finish_step(self) -> None:
        """Free the KV blocks of requests that have all their tokens, and move to the next step."""
        for r in self.running:
            if r.finished:
                self.kv_cache.free(r.req.rid)
                self.committed -= self._blocks(r)
        self.running = [r for r in self.running if not r.finished]
        self.step += 1

    def _fits(self, r: Running) -> bool:
        return self.committed + self._blocks(r) <= self.capacity

    def _blocks(self, r: Running) -> int:
        return self.kv_cache.blocks_needed(len(r.req.prompt_ids) + r.req.max_new_tokens)
