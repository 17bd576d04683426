"""ModelRunner: owns the model, its paged KV cache and attention backend; runs one forward.

Decode steps go to `graph_runner` when one is plugged in and can take the batch, or in mode compile_nograph to
`compiled_step` (the compiled forward, no graph); prefill steps go to
`prefill_graphs` when prefill graphs are on (as token rows, replayed or eager); everything else, and the
graph runners' own capture, goes through `forward_eager`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from reference_runner.attention import get_attn_backend
from reference_runner.engine.forward_batch import ExpertRouting, ForwardBatch, ForwardMode
from reference_runner.engine.kv_cache import KVCache
from reference_runner.models.loader import load_model
from reference_runner.models.moe import SparseMoeBlock
from reference_runner.parallel.dp_attention import dp_buffer_len, set_dp_buffer_len
from reference_runner.parallel.state import ParallelState, kv_heads_per_rank


class ModelRunner:
    """One model on one device (this rank's shard under TP) with its KV cache and attention backend."""

    def __init__(self, model_path: str | Path, *, device: str, dtype: torch.dtype, max_context: int,
                 block_size: int, num_blocks: int, parallel: ParallelState | None = None):
        self.device = device
        self.dtype = dtype
        self.parallel = parallel or ParallelState()
        self.model = load_model(model_path, device=device, dtype=dtype, parallel=self.parallel,
                                max_positions=max_context)
        config = self.model.config
        self.vocab_size = config.vocab_size
        tp = self.parallel.tp_size
        self.kv_cache = KVCache(num_layers=config.num_hidden_layers,
                                num_kv_heads=kv_heads_per_rank(config.num_key_value_heads, tp),
                                head_dim=config.head_dim, num_blocks=num_blocks, block_size=block_size,
                                max_context=max_context, dtype=dtype, device=device)
        self.attn_backend = get_attn_backend(device, self.kv_cache, config.num_attention_heads // tp)
        moe_blocks = [m for m in self.model.modules() if isinstance(m, SparseMoeBlock)]
        # (MoE layers, top-k, experts) of the routing each forward records and may replay; None for a dense model.
        self.routing_shape = (len(moe_blocks), moe_blocks[0].top_k, moe_blocks[0].num_experts) if moe_blocks else None
        self.graph_runner = None  # set by the engine in graph modes
        self.compiled_step = None  # set by the engine in mode compile_nograph: the decode step compiled, no graph
        self.compiled_max_bs = 0  # the largest batch it takes: compile mode's largest graph (larger ones run eager there)
        self.prefill_graphs = None  # set by the engine with prefill graphs on (graphs/prefill.py)

    def own_routing(self, num_tokens: int) -> ExpertRouting | None:
        """Routing buffers for a forward of `num_tokens` tokens, nothing replayed; None for a dense model."""
        if self.routing_shape is None:
            return None
        moe_layers, top_k, _ = self.routing_shape
        return ExpertRouting.own(num_tokens, moe_layers, top_k, self.device)

    def forward(self, forward_batch: ForwardBatch) -> tuple[torch.Tensor, bool]:
        """Float32 logits [bs, vocab] and whether the step replayed a device graph."""
        if forward_batch.forward_mode is ForwardMode.EXTEND and self.prefill_graphs is not None:
            return self.prefill_graphs.forward(forward_batch)
        if (self.graph_runner is not None and forward_batch.forward_mode is ForwardMode.DECODE
                and self.graph_runner.can_run(forward_batch)):
            logits = self.graph_runner.replay(forward_batch)
            return logits, self.graph_runner.replay_fallback is None
        if (self.compiled_step is not None and forward_batch.forward_mode is ForwardMode.DECODE
                and forward_batch.batch_size > 0 and dp_buffer_len(forward_batch) <= self.compiled_max_bs):
            return self.compiled_step(forward_batch), False  # (an idle DP rank's empty batch has no row to read)
        return self.forward_eager(forward_batch), False

    def forward_eager(self, forward_batch: ForwardBatch) -> torch.Tensor:
        """The plain eager forward (also what a graph runner records during capture)."""
        set_dp_buffer_len(dp_buffer_len(forward_batch))
        return self.model(forward_batch, self.attn_backend)
