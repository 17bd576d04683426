"""Prefill graphs: the prefill step captured whole, per token bucket, in the pool the decode graphs use.

A prefill of R requests and T tokens runs as T decode-shaped rows, one per token: each row attends over its
own request's paged KV up to itself (KV length = position + 1, the block-table row of its request), through
the device's decode attention (FIA with its host list refreshed by `update()` on Ascend and on the CPU's
SimNPUGraph, device `seq_lens` on CUDA), after the step has written every token's K and V. That is a static
attention form: shapes depend on T alone, so a batch padded to a bucket (padded rows: length 0 or the
dummy slot, as in decode) replays one graph, and the last token's row of each request is picked by a static
index buffer inside the graph. Eager prefill runs the same rows, unpadded, so that replay is compared against
the very kernels it captured (each row is computed on its own: padding changes no real row).
Why whole and not piecewise: docs/design.md.
"""
from __future__ import annotations

import torch

from reference_runner.engine.args import EngineArgs
from reference_runner.engine.forward_batch import ForwardBatch, ForwardMode
from reference_runner.graphs.runner import GraphRunner, make_graph_runner

SMALLEST_BUCKET = 16  # tokens


def prefill_token_buckets(max_context: int) -> list[int]:
    """Token counts to capture: powers of two from SMALLEST_BUCKET below `max_context`, then `max_context`."""
    sizes = [n for n in (SMALLEST_BUCKET << i for i in range(32)) if n < max_context]
    return [*sizes, max_context]


def token_rows(forward_batch: ForwardBatch) -> tuple[ForwardBatch, torch.Tensor]:
    """The prefill `forward_batch` as one decode row per token (prefill from position 0), and the row of each
    request's last token."""
    lens = forward_batch.extend_seq_lens
    device = forward_batch.input_ids.device
    per_request = torch.tensor(lens, device=device)
    seq_lens_cpu = [position + 1 for n in lens for position in range(n)]
    rows = ForwardBatch(
        forward_mode=ForwardMode.DECODE,
        batch_size=len(seq_lens_cpu),
        input_ids=forward_batch.input_ids,
        positions=forward_batch.positions,
        out_cache_loc=forward_batch.out_cache_loc,
        seq_lens=(forward_batch.positions + 1).to(torch.int32),
        seq_lens_cpu=seq_lens_cpu,
        block_tables=forward_batch.block_tables.repeat_interleave(per_request, dim=0),
        global_num_tokens=forward_batch.global_num_tokens,
        routing=forward_batch.routing,  # one row per token, as the prefill's: replayed experts in, own choices out
    )
    return rows, per_request.cumsum(0) - 1


class PrefillGraphs:
    """Prefill as token rows: replayed from the graphs of `runner` where one holds the step (after `capture`),
    eager otherwise."""

    def __init__(self, model_runner, max_context: int) -> None:
        self.model_runner = model_runner
        self.buckets = prefill_token_buckets(max_context)
        self.max_tokens = self.buckets[-1]
        # Which row of the step's logits is each request's last token: a static buffer the graphs read.
        self.last_rows = torch.zeros(self.max_tokens, dtype=torch.int64, device=model_runner.device)
        self.runner: GraphRunner | None = None

    def capture(self, mode: str, replay_timeout_s: float = EngineArgs.replay_timeout_s, pool=None) -> GraphRunner:
        """Capture a graph per token bucket in engine `mode`, into `pool` (shared with the decode graphs)."""
        self.runner = make_graph_runner(self.model_runner, self.max_tokens, tuple(self.buckets), mode, replay_timeout_s,
                                        forward=self.forward_rows, name="prefill graph tokens", pool=pool)
        return self.runner

    def forward_rows(self, rows: ForwardBatch) -> torch.Tensor:
        """What a prefill graph captures: the rows' forward, then the logits of each request's last token."""
        return self.model_runner.forward_eager(rows).index_select(0, self.last_rows[:rows.batch_size])

    def fallback_reason(self, forward_batch: ForwardBatch) -> str | None:
        """Why this prefill cannot replay a graph, or None when it can."""
        tokens = forward_batch.input_ids.shape[0]
        if tokens > self.max_tokens:
            return f"prefill of {tokens} tokens above the largest prefill graph ({self.max_tokens} tokens)"
        return None

    @property
    def replay_fallback(self) -> str | None:
        """Why the last replayed prefill ran no captured graph (graph trees), None when it replayed one."""
        return self.runner.replay_fallback

    def forward_eager(self, forward_batch: ForwardBatch) -> torch.Tensor:
        """The prefill's token rows run eagerly: float32 logits of each request's last token."""
        rows, last = token_rows(forward_batch)
        return self.model_runner.forward_eager(rows).index_select(0, last)

    def forward(self, forward_batch: ForwardBatch) -> tuple[torch.Tensor, bool]:
        """Float32 logits of each request's last token, and whether they came from a replayed graph."""
        if self.runner is None or self.fallback_reason(forward_batch) is not None:
            return self.forward_eager(forward_batch), False
        rows, last = token_rows(forward_batch)
        self.last_rows[:last.shape[0]].copy_(last)
        self.last_rows[last.shape[0]:].zero_()  # padded entries pick row 0, inside every bucket
        logits = self.runner.replay(rows)[:last.shape[0]]
        return logits, self.runner.replay_fallback is None
