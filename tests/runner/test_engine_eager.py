"""The eager engine against the transformers oracle, token by token, under continuous batching."""
import pytest
import torch

from harness.inputs.checkpoints import ensure_checkpoint
from harness.inputs.oracle import oracle_generate
from harness.verdicts.compare import compare_generations
from harness.verdicts.tolerances import Tolerance
from reference_runner.engine.args import EngineArgs
from reference_runner.engine.engine import Engine
from reference_runner.records import Request

BLOCK = 8
FP32 = Tolerance(logprob_atol=1e-4, tie_margin=1e-2)


def mixed_requests(vocab=512):
    """Prompts below, on and across block boundaries; arrivals while others decode; staggered finishes."""
    shapes = [  # (prompt length, max_new_tokens, arrival_step)
        (1, 32, 0), (7, 40, 0), (8, 33, 1), (9, 36, 1), (16, 32, 3), (17, 35, 6), (30, 38, 9), (5, 1, 4),
    ]
    g = torch.Generator().manual_seed(0)
    return [Request(f"r{i}", torch.randint(vocab, (n,), generator=g).tolist(), new, arrival)
            for i, (n, new, arrival) in enumerate(shapes)]


def assert_matches_oracle(checkpoint, generations, requests):
    verdicts = compare_generations(oracle_generate(checkpoint, requests), generations, FP32)
    assert [v.status for v in verdicts] == ["match"] * len(requests), [v.reason for v in verdicts]


@pytest.mark.parametrize("model", ["llama", "qwen2", "llama_kv1", "qwen3"])
def test_eager_engine_matches_oracle_with_requests_joining_and_leaving(model):
    checkpoint = ensure_checkpoint(model)
    requests = mixed_requests()
    engine = Engine(checkpoint, EngineArgs(block_size=BLOCK, max_context=128))
    generations = engine.generate(requests)
    assert [g.rid for g in generations] == [r.rid for r in requests]
    assert [len(g.output_ids) for g in generations] == [r.max_new_tokens for r in requests]
    assert not any(step for g in generations for step in g.graph_steps)
    assert_matches_oracle(checkpoint, generations, requests)


def test_finished_requests_free_their_blocks():
    engine = Engine(ensure_checkpoint("llama"), EngineArgs(block_size=BLOCK, max_context=128))
    free = engine.kv_cache.allocator.num_free
    engine.generate(mixed_requests())
    assert engine.kv_cache.allocator.num_free == free
    assert not engine.kv_cache.block_tables


def test_requests_wait_for_blocks_when_the_pool_is_full():
    # Room for one full-length request at a time: the others queue behind it and still match.
    checkpoint = ensure_checkpoint("llama")
    requests = mixed_requests()[:4]
    engine = Engine(checkpoint, EngineArgs(block_size=BLOCK, max_context=64, num_blocks=64 // BLOCK + 1))
    assert_matches_oracle(checkpoint, engine.generate(requests), requests)


@pytest.mark.parametrize("overrides", [
    {"attention_bias": True},  # bias on q, k, v and o
    {"tie_word_embeddings": True},
    {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
], ids=["attention-bias", "tied", "llama3-rope"])
def test_llama_variants_match_oracle(overrides):
    checkpoint = ensure_checkpoint("llama", **overrides)
    requests = mixed_requests()[:4]
    assert_matches_oracle(checkpoint, Engine(checkpoint, EngineArgs(block_size=BLOCK, max_context=128)).generate(requests),
                          requests)


def test_step_results_are_read_after_the_next_forward():
    # Overlap scheduling: a runner whose logits are views of one static buffer (a graph runner that
    # forgot to copy its outputs) is overwritten before the engine reads them, and the comparison says so.
    checkpoint = ensure_checkpoint("llama")
    engine = Engine(checkpoint, EngineArgs(block_size=BLOCK, max_context=128))
    runner, static = engine.model_runner, torch.empty(64, 512)
    honest_forward = runner.forward

    def forward_returning_a_view(batch):
        logits, in_graph = honest_forward(batch)
        out = static[: batch.batch_size]
        out.copy_(logits)
        return out, in_graph

    runner.forward = forward_returning_a_view
    requests = mixed_requests()[:3]
    verdicts = compare_generations(oracle_generate(checkpoint, requests), engine.generate(requests), FP32)
    assert any("inconsistent" in v.reason for v in verdicts)
