"""Memory reuse: every captured size shares one pool and the static buffers, so all sizes together
hold little more than the largest alone, and the graphs replay correctly in any order."""
import random

import pytest
import torch

from harness.inputs.checkpoints import ensure_checkpoint
from reference_runner.attention import default_dtype
from reference_runner.engine.args import EngineArgs
from reference_runner.engine.engine import Engine
from reference_runner.engine.forward_batch import ForwardBatch, decode_batch

# The engine defaults, as the check scenarios use them: compiled graphs come from inductor's cache.
MAX_BS, MAX_CONTEXT = EngineArgs.max_bs, EngineArgs.max_context


def engine(device: str, mode: str, graph_bs: tuple[int, ...] | None = None, prefill_graphs: bool = False) -> Engine:
    return Engine(ensure_checkpoint("llama"), EngineArgs(mode=mode, dtype=default_dtype(device), graph_bs=graph_bs,
                                                         prefill_graphs=prefill_graphs), device=device)


def random_decode_batch(engine: Engine, rids: list[str], seq_lens: list[int]) -> ForwardBatch:
    """Decode one random token for each of `rids`, whose KV (random values) already holds `seq_len - 1` tokens."""
    input_ids = torch.randint(engine.model_runner.vocab_size, (len(rids),), device=engine.device)
    return decode_batch(engine.kv_cache, rids, seq_lens, input_ids)


@pytest.mark.parametrize("mode", ["graph", "compile"])
def test_all_sizes_hold_at_most_a_tenth_more_than_the_largest_alone(device, mode):
    report = engine(device, mode).graph_memory()
    alone = engine(device, mode, graph_bs=(MAX_BS,)).model_runner.graph_runner.graph_memory_bytes()
    assert report["largest_bucket_bytes"] == alone
    assert alone <= report["all_buckets_bytes"] <= 1.1 * alone


@pytest.mark.parametrize("mode", ["graph", pytest.param("compile", marks=pytest.mark.slow)])  # compile: ~60 s
def test_prefill_and_decode_families_hold_at_most_a_tenth_more_than_the_largest_alone(device, mode):
    report = engine(device, mode, prefill_graphs=True).graph_memory()
    decode_alone = engine(device, mode).graph_memory()["all_buckets_bytes"]
    assert decode_alone <= report["largest_family_bytes"]  # the prefill family, captured first, is the largest
    assert report["largest_family_bytes"] <= report["all_families_bytes"] <= 1.1 * report["largest_family_bytes"]


@pytest.mark.parametrize("mode", ["graph", "compile"])
def test_sizes_replay_correctly_in_random_order(device, mode):
    torch.manual_seed(0)
    subject = engine(device, mode)
    kv = subject.kv_cache
    for cache in kv.key_caches + kv.value_caches:
        cache.normal_()
    rng = random.Random(0)
    sizes = [bs for bs in range(1, MAX_BS + 1) for _ in range(3)]
    rng.shuffle(sizes)
    runner = subject.model_runner.graph_runner
    with torch.no_grad():
        for step, bs in enumerate(sizes):
            rids = [f"s{step}r{i}" for i in range(bs)]
            batch = random_decode_batch(subject, rids, [rng.randint(1, MAX_CONTEXT) for _ in rids])
            expected = subject.model_runner.forward_eager(batch)
            torch.testing.assert_close(runner.replay(batch), expected, rtol=0, atol=1e-4)
            for rid in rids:
                kv.free(rid)
    assert set(runner.bucket_hits) == {1, 2, 4, 8}
