"""Graph families in one pool (the graph-mode RFC's Goal 2): decode graphs per batch size and prefill graphs per
token bucket, captured into one memory pool, or handed to torch's graph trees (mode tree, on cuda and npu).

A shared pool is where a runner silently corrupts output: any replay writes over the outputs of every other
graph of the pool, a graph reads the KV cache where it was at capture, and shapes past the captured ones must
fall back visibly. Each scenario runs in every mode that captures graphs on the device, and compares every
replay with the eager forward of the same batch.
"""
import copy
import random

import pytest
import torch

from harness.inputs.checkpoints import ensure_checkpoint
from harness.inputs.workloads import make_requests
from harness.verdicts.compare import compare_generations
from harness.verdicts.tolerances import Tolerance
from reference_runner.attention import default_dtype
from reference_runner.engine.args import EngineArgs
from reference_runner.engine.engine import Engine
from reference_runner.engine.forward_batch import ForwardBatch, ForwardMode, decode_batch
from reference_runner.records import Request
from reference_runner.sim.pool import SimGraphPool
from suites.faults import STALE_KV_CACHE

# Compiled mode builds its own engines (about 90 s of compiling on 2 cores): the long matrix (--nightly) runs it.
MODES = ["graph", pytest.param("compile", marks=pytest.mark.slow), "tree"]
MAX_BS, MAX_CONTEXT = 8, 64  # decode graphs at 1, 2, 4, 8; prefill graphs at 16, 32, 64 tokens
ALTERNATING = [8, 3, 8, 1, 8, 2, 5, 8, 1, 3]


@pytest.fixture(scope="module")
def engines(device):
    """`engines(mode, prefill_graphs)`: one engine per mode, built once (the KV cache is reallocated only by the
    test that says so, and the engines capture again after it)."""
    cache: dict[tuple[str, bool], Engine] = {}

    def get(mode: str, prefill_graphs: bool = True) -> Engine:
        if mode == "tree" and device == "cpu":
            pytest.skip("the CPU has no graph trees: mode tree runs on cuda and npu")
        if (mode, prefill_graphs) not in cache:
            args = EngineArgs(mode=mode, dtype=default_dtype(device), max_bs=MAX_BS, max_context=MAX_CONTEXT,
                              prefill_graphs=prefill_graphs)
            cache[mode, prefill_graphs] = Engine(ensure_checkpoint("llama"), args, device=device)
        return cache[mode, prefill_graphs]

    return get


def randomize_kv(engine: Engine, seed: int) -> None:
    torch.manual_seed(seed)
    for cache in engine.kv_cache.key_caches + engine.kv_cache.value_caches:
        cache.normal_()


def decode(engine: Engine, rng: random.Random, bs: int, step: int) -> ForwardBatch:
    """A decode batch of `bs` new requests, each with random KV already cached up to a random length."""
    rids = [f"d{step}r{i}" for i in range(bs)]
    input_ids = torch.tensor([rng.randrange(engine.model_runner.vocab_size) for _ in rids], device=engine.device)
    return decode_batch(engine.kv_cache, rids, [rng.randint(1, MAX_CONTEXT) for _ in rids], input_ids)


def prefill(engine: Engine, rng: random.Random, prompt_lens: list[int], step: int) -> ForwardBatch:
    """A prefill batch of new requests with prompts of `prompt_lens` tokens."""
    kv, device = engine.kv_cache, engine.device
    rids = [f"p{step}r{i}" for i in range(len(prompt_lens))]
    slots = []
    for rid, n in zip(rids, prompt_lens):
        kv.reserve(rid, n)
        slots += kv.slots(rid, 0, n)
    return ForwardBatch(
        forward_mode=ForwardMode.EXTEND, batch_size=len(rids),
        input_ids=torch.tensor([rng.randrange(engine.model_runner.vocab_size) for _ in slots], device=device),
        positions=torch.tensor([p for n in prompt_lens for p in range(n)], device=device),
        out_cache_loc=torch.tensor(slots, dtype=kv.slot_dtype, device=device),
        seq_lens=torch.tensor(prompt_lens, dtype=torch.int32, device=device), seq_lens_cpu=list(prompt_lens),
        block_tables=kv.block_table_tensor(rids, device), extend_seq_lens=list(prompt_lens))


def free(engine: Engine, step: int) -> None:
    """Give back the KV blocks of the requests `decode` and `prefill` made at `step`."""
    for rid in [rid for rid in engine.kv_cache.block_tables if rid[1:].startswith(f"{step}r")]:
        engine.kv_cache.free(rid)


def replay_matches_eager(engine: Engine, batch: ForwardBatch) -> torch.Tensor:
    """Replay `batch` after its eager forward (which writes the same KV), check both agree, return the replay's."""
    runner = engine.model_runner
    expected = (runner.prefill_graphs.forward_eager(batch) if batch.forward_mode is ForwardMode.EXTEND
                else runner.forward_eager(batch))
    logits, in_graph = runner.forward(batch)
    assert in_graph
    assert_same(logits, expected)
    return logits


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Within float noise: a padded batch may take another matmul kernel, compiled code another order."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-4)


def sim_pool(engine: Engine) -> SimGraphPool | None:
    pool = engine.graph_families[0].pool
    return pool if isinstance(pool, SimGraphPool) else None


@pytest.mark.parametrize("mode", MODES)
def test_alternating_buckets_keep_the_pool_flat(engines, mode):
    subject, rng = engines(mode), random.Random(0)
    randomize_kv(subject, 0)
    runner = subject.model_runner.graph_runner
    pool_bytes = []
    with torch.no_grad():
        for step, bs in enumerate(ALTERNATING):
            replay_matches_eager(subject, decode(subject, rng, bs, step))
            free(subject, step)
            pool_bytes.append(runner.pool_bytes())
    assert len(set(pool_bytes)) == 1
    assert pool_bytes[0] > 0


@pytest.mark.parametrize("mode", MODES)
def test_logits_of_a_step_hold_while_the_next_step_replays(engines, mode):
    subject, rng = engines(mode), random.Random(1)
    randomize_kv(subject, 1)
    runner = subject.model_runner.graph_runner
    with torch.no_grad():
        first, second = decode(subject, rng, 3, 0), decode(subject, rng, 8, 1)
        expected = subject.model_runner.forward_eager(first)
        held, _ = subject.model_runner.forward(first)
        replay_matches_eager(subject, second)
    assert_same(held, expected)
    if pool := sim_pool(subject):  # the pool buffer step 0 replayed into was overwritten: only the copy held
        assert pool.last_writer(runner.output_buffers[4]) == "graph bs=8"


@pytest.mark.parametrize("mode", MODES)
def test_prefill_and_decode_graphs_interleave_in_one_pool(engines, mode):
    subject, rng = engines(mode), random.Random(2)
    randomize_kv(subject, 2)
    prefill_runner, decode_runner = subject.model_runner.prefill_graphs.runner, subject.model_runner.graph_runner
    assert subject.graph_families == [prefill_runner, decode_runner]  # the largest graph first
    before = decode_runner.pool_bytes()
    prompts = [[5, 17], [1], [33, 9, 16], [40], [3, 2, 1], [60]]  # 16-, 32- and 64-token buckets
    with torch.no_grad():
        for step, (prompt_lens, bs) in enumerate(zip(prompts, [4, 1, 8, 3, 2, 6])):
            prefill_logits = replay_matches_eager(subject, prefill(subject, rng, prompt_lens, step))
            replay_matches_eager(subject, decode(subject, rng, bs, step))
            if pool := sim_pool(subject):  # the decode replay wrote over the prefill graph's output
                bucket = min(n for n in prefill_runner.capture_bs if n >= sum(prompt_lens))
                assert pool.last_writer(prefill_runner.output_buffers[bucket]).startswith("graph bs=")
            assert prefill_logits.shape[0] == len(prompt_lens)
            free(subject, step)
    assert decode_runner.pool_bytes() == before
    if mode != "tree":
        assert prefill_runner.pool is decode_runner.pool


@pytest.mark.parametrize("mode", MODES)
def test_kv_cache_reallocated_between_replays_is_captured_again(engines, mode):
    subject, rng = engines(mode), random.Random(3)
    randomize_kv(subject, 3)
    runner = subject.model_runner.graph_runner
    recaptures = runner.recaptures
    with torch.no_grad():
        replay_matches_eager(subject, decode(subject, rng, 4, 0))
        subject.kv_cache.allocate()
        randomize_kv(subject, 4)
        replay_matches_eager(subject, decode(subject, rng, 4, 1))
    assert runner.recaptures == recaptures + 1
    free(subject, 0)
    free(subject, 1)


def two_generations(engine: Engine) -> list:
    """`mixed`, then, with the KV cache reallocated in between, `batch5`: the generations of both."""
    vocab_size = engine.model_runner.vocab_size
    first = engine.generate(make_requests("mixed", vocab_size, 12))
    engine.kv_cache.allocate()
    return first + engine.generate(make_requests("batch5", vocab_size, 12))


@pytest.mark.parametrize("stale", [False, True], ids=["captured-again", "stale-addresses"])
def test_graphs_reading_a_reallocated_kv_cache_at_old_addresses_are_caught(engines, monkeypatch, stale):
    # Decode graphs alone: the eager prefill writes the new pools, which stale decode graphs never read.
    eager, subject = engines("eager", prefill_graphs=False), engines("graph", prefill_graphs=False)
    baseline = two_generations(eager)
    if stale:
        STALE_KV_CACHE.inject(monkeypatch)
    verdicts = compare_generations(baseline, two_generations(subject),
                                   Tolerance.for_pair(subject.model_runner.dtype, subject.device, across_kernels=False))
    mismatched = {v.rid for v in verdicts if v.status == "mismatch"}
    assert (mismatched == {f"b{i}" for i in range(5)}) if stale else (mismatched == set())
    assert {v.status for v in verdicts if v.rid.startswith("r")} == {"match"}


@pytest.mark.parametrize("mode", MODES)
def test_shapes_past_the_captured_ones_each_fall_back_counted(engines, mode):
    subject = engines(mode)
    vocab_size, rng = subject.model_runner.vocab_size, random.Random(5)
    # 13 requests at once, the i-th decoding 1 + i steps: one prefill of 117 tokens (above the 64-token bucket),
    # then decode batches of 13, 12, ..., 1 rows: the first five above max_bs 8.
    requests = [Request(f"w{i}", [rng.randrange(vocab_size) for _ in range(3 + i)], 2 + i) for i in range(13)]
    before = copy.deepcopy(subject.stats)
    generations = subject.generate(requests)
    after = subject.stats
    assert [g.error for g in generations] == [None] * 13
    assert after.fallback_reasons - before.fallback_reasons == {
        "prefill of 117 tokens above the largest prefill graph (64 tokens)": 1,
        **{f"batch size {n} above max_bs 8": 1 for n in range(9, 14)}}
    assert (after.graph_steps - before.graph_steps, after.eager_steps - before.eager_steps) == (8, 5)
    assert (after.prefill_graph_steps - before.prefill_graph_steps,
            after.prefill_eager_steps - before.prefill_eager_steps) == (0, 1)
