"""Graph mode equals eager while every shape around the graphs moves (harness/dynamic.py).

Hypothesis draws request mixes: staggered arrivals and finishes (the decode batch crosses capture
sizes between steps, up to above max_bs), prompts of 1 to all KV blocks, requests that grow to
exactly `max_context` (block tables full to the last column). A failing mix is shrunk and printed
as `Mix([prompt_len+new_tokens@arrival_step, ...])`. 50 mixes per model, 500 with --nightly;
one eager and one graph engine per model serve them all.
"""
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.inputs.checkpoints import ensure_checkpoint
from harness.inputs.dynamic import Mix, MixLimits, request_shape, sample_mix
from harness.verdicts.compare import compare_generations
from harness.verdicts.tolerances import Tolerance
from reference_runner.attention import default_dtype
from reference_runner.engine.args import EngineArgs
from reference_runner.engine.engine import Engine
from suites.faults import block_table_kept_at

MODELS = ["llama", "qwen2_moe"]
LIMITS = MixLimits(max_context=64, max_requests=10, max_new_tokens=12, max_arrival=8)
MAX_BS, BLOCK_SIZE = 8, 8  # 8 blocks per sequence; capture sizes 1, 2, 4, 8
EXAMPLES = {False: 50, True: 500}  # per model: default run, --nightly


def mixes(limits: MixLimits) -> st.SearchStrategy[Mix]:
    """Mixes of 1..max_requests requests; shrinking removes requests and moves each toward `1+1@0`."""
    shape = st.builds(request_shape, prompt_len=st.integers(1, limits.max_context - 1),
                      new_tokens=st.integers(1, limits.max_new_tokens), arrival=st.integers(0, limits.max_arrival),
                      to_the_end=st.booleans(), limits=st.just(limits))
    return st.lists(shape, min_size=1, max_size=limits.max_requests).map(lambda shapes: Mix(tuple(shapes)))


@pytest.fixture(scope="module")
def engines(device) -> Callable[[str, str], Engine]:
    """`engines(model, mode)`: built once, reused by every example (generate frees its KV blocks)."""
    cache: dict[tuple[str, str], Engine] = {}

    def get(model: str, mode: str) -> Engine:
        if (model, mode) not in cache:
            args = EngineArgs(mode=mode, dtype=default_dtype(device), max_bs=MAX_BS, block_size=BLOCK_SIZE,
                              max_context=LIMITS.max_context)
            cache[model, mode] = Engine(ensure_checkpoint(model), args, device=device)
        return cache[model, mode]

    return get


def assert_all_blocks_free(engine: Engine) -> None:
    kv = engine.kv_cache
    assert (kv.block_tables, kv.allocator.num_free) == ({}, kv.allocator.num_blocks - 1)


@pytest.mark.parametrize("model", MODELS)
def test_graph_matches_eager_on_generated_mixes(pytestconfig, engines, model):
    eager, graph = engines(model, "eager"), engines(model, "graph")
    vocab_size = eager.model_runner.vocab_size
    tolerance = Tolerance.for_pair(eager.model_runner.dtype, eager.device, across_kernels=False)
    nightly = pytestconfig.getoption("--nightly")
    reached_last_column = []

    @settings(max_examples=EXAMPLES[nightly], deadline=None, derandomize=not nightly, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(mix=mixes(LIMITS))
    def graph_matches_eager(mix: Mix) -> None:
        requests = mix.requests(vocab_size)
        verdicts = compare_generations(eager.generate(requests), graph.generate(requests), tolerance)
        assert [f"{v.rid}: {v.reason}" for v in verdicts if v.status != "match"] == []
        assert_all_blocks_free(eager)
        assert_all_blocks_free(graph)
        # The last decode step of a request ending at max_context reads the last block-table column.
        reached_last_column.append(any(s.prompt_len + s.new_tokens == LIMITS.max_context and s.new_tokens > 1
                                       for s in mix.shapes))

    graph_matches_eager()
    runner = graph.model_runner.graph_runner
    assert set(runner.bucket_hits) == set(runner.capture_bs) == {1, 2, 4, 8}
    assert len(reached_last_column) == EXAMPLES[nightly]
    assert any(reached_last_column)


def test_seeded_mixes_are_valid_and_cover_the_dynamic_shapes():
    drawn = [sample_mix(seed, LIMITS) for seed in range(50)]
    shapes = [s for mix in drawn for s in mix.shapes]
    assert sample_mix(7, LIMITS) == drawn[7]
    assert all(s.prompt_len >= 1 and s.new_tokens >= 1 and s.prompt_len + s.new_tokens <= LIMITS.max_context
               for s in shapes)
    assert min(s.prompt_len for s in shapes) <= BLOCK_SIZE  # one block
    assert any(s.prompt_len + s.new_tokens == LIMITS.max_context for s in shapes)  # the last column
    assert {len(mix.shapes) > MAX_BS for mix in drawn} == {True, False}  # above max_bs, and not
    assert len({s.arrival for s in shapes}) == LIMITS.max_arrival + 1


def test_a_mix_prints_as_its_request_shapes():
    mix = Mix((request_shape(5, 3, 0, False, LIMITS), request_shape(30, 12, 2, True, LIMITS)))
    assert repr(mix) == "Mix([5+3@0, 52+12@2])"
    assert [(r.rid, len(r.prompt_ids), r.max_new_tokens, r.arrival_step) for r in mix.requests(512)] == [
        ("d0", 5, 3, 0), ("d1", 52, 12, 2)]


CAPTURE_WIDTH = LIMITS.max_context // BLOCK_SIZE - 1  # the blocks the capture-time batch needed: all but one


def test_block_table_frozen_at_capture_width_is_caught_near_max_context(engines, monkeypatch):
    eager, graph = engines("llama", "eager"), engines("llama", "graph")
    requests = Mix((request_shape(50, 14, 0, True, LIMITS),)).requests(eager.model_runner.vocab_size)
    reference = eager.generate(requests)
    tolerance = Tolerance.for_pair(eager.model_runner.dtype, eager.device, across_kernels=False)
    assert [v.status for v in compare_generations(reference, graph.generate(requests), tolerance)] == ["match"]
    block_table_kept_at(CAPTURE_WIDTH).inject(monkeypatch)
    (verdict,) = compare_generations(reference, graph.generate(requests), tolerance)
    # Output token k of a 50-token prompt comes from attention over 50 + k tokens: k = 7 is the first
    # step that reads the 8th block (tokens 56..63).
    assert (verdict.status, verdict.step) == ("mismatch", 7)
