"""Forcing: a request's forced tokens are fed from their step on, in eager, graph and compile mode alike (only
the input ids written into the static buffers change), while the engine records its own top-k logprobs at
every step; a MoE request's replayed experts are computed with, while each router's own choice is recorded."""
import dataclasses
import random
import re

import pytest

from harness.inputs.checkpoints import ensure_checkpoint
from harness.inputs.oracle import oracle_score
from harness.inputs.workloads import make_requests
from reference_runner.engine.args import EngineArgs
from reference_runner.engine.engine import Engine
from reference_runner.errors import InvalidRequest
from reference_runner.records import Generation, Request

# Compiled mode forces as graph mode does (only the static buffers' contents change); it takes about two minutes
# to compile here, so the long matrix (--nightly) runs it, and suites/test_faults.py forces past near-ties in it.
MODES = ["eager", "graph", pytest.param("compile", marks=pytest.mark.slow)]
REQUESTS = make_requests("mixed", vocab_size=512, max_new_tokens=16)  # joins and leaves: batches of 1..8 rows
FORCED_FROM = 3


@pytest.fixture(scope="module")
def engines():
    cache: dict[tuple[str, str, str, bool], Engine] = {}

    def get(model: str, mode: str, dtype: str = "float32", prefill_graphs: bool = False) -> Engine:
        key = (model, mode, dtype, prefill_graphs)
        if key not in cache:
            cache[key] = Engine(ensure_checkpoint(model), EngineArgs(mode=mode, dtype=dtype, prefill_graphs=prefill_graphs))
        return cache[key]

    return get


def with_forced_tokens(requests: list[Request]) -> list[Request]:
    """Each request forced from step FORCED_FROM with seeded tokens (shorter requests: from their last step)."""
    rng = random.Random(0)
    forced = []
    for r in requests:
        start = min(FORCED_FROM, r.max_new_tokens - 1)
        forced.append(dataclasses.replace(r, forced_from=start,
                                          forced_ids=[rng.randrange(512) for _ in range(r.max_new_tokens - start)]))
    return forced


def replaying(requests: list[Request], generations: list[Generation], expert=lambda e: e) -> list[Request]:
    """Each request replaying the experts its generation's routers chose, mapped through `expert`."""
    return [dataclasses.replace(r, forced_experts=[[[expert(e) for e in ids] for ids in layers]
                                                   for fed in g.routed_experts for layers in fed])
            for r, g in zip(requests, generations)]


def records(generations: list[Generation]) -> list[tuple]:
    return [(g.output_ids, g.top_logprobs, g.routed_experts, g.router_gaps) for g in generations]


@pytest.mark.parametrize("mode", MODES)
def test_forced_tokens_are_fed_from_their_step_on(engines, mode):
    engine = engines("llama", mode)
    free = engine.generate(REQUESTS)
    forced = with_forced_tokens(REQUESTS)
    for request, generation, own in zip(forced, engine.generate(forced), free):
        start = request.forced_from
        assert generation.forced_from == start
        assert generation.output_ids[start:] == request.forced_ids
        assert generation.output_ids[:start] == own.output_ids[:start]


@pytest.mark.parametrize("mode", MODES)
def test_the_logprobs_recorded_under_forcing_are_the_engines_own_on_the_forced_prefix(engines, mode):
    engine = engines("llama", mode)
    forced = with_forced_tokens(REQUESTS)
    generations = engine.generate(forced)
    oracle = oracle_score(ensure_checkpoint("llama"), forced, generations)
    for generation, truth in zip(generations, oracle):
        for top, expected in zip(generation.top_logprobs, truth.top_logprobs):
            assert [t for t, _ in top] == [t for t, _ in expected]
            assert [lp for _, lp in top] == pytest.approx([lp for _, lp in expected], abs=1e-4)
    # Random forced tokens are rarely the model's choice: the records keep its own top-1, not the fed token.
    assert any(g.top_logprobs[step][0][0] != g.output_ids[step] for g in generations
               for step in range(g.forced_from, len(g.output_ids)))


# In bfloat16, where graph replay and eager measure bit-identical on the CPU (float32 matrix products there
# round differently at the padded batch size: harness/verdicts/tolerances.py).

def test_graph_mode_forces_exactly_as_eager_and_replays_every_step(engines):
    forced = with_forced_tokens(REQUESTS)
    graph = engines("llama", "graph", "bfloat16")
    before = graph.stats.graph_steps
    assert records(graph.generate(forced)) == records(engines("llama", "eager", "bfloat16").generate(forced))
    assert graph.stats.graph_steps > before


def test_dense_generations_record_no_routing(engines):
    assert all(not g.routed_experts and not g.router_gaps for g in engines("llama", "eager").generate(REQUESTS))


@pytest.mark.parametrize("prefill_graphs", [False, True], ids=["prefill", "prefill-as-token-rows"])
def test_moe_generations_record_the_routing_of_every_fed_token(engines, prefill_graphs):
    engine = engines("qwen2_moe", "graph", prefill_graphs=prefill_graphs)
    moe_layers, top_k, num_experts = engine.model_runner.routing_shape
    for request, generation in zip(REQUESTS, engine.generate(REQUESTS)):
        fed = [len(step) for step in generation.routed_experts]
        assert fed == [len(request.prompt_ids)] + [1] * (request.max_new_tokens - 1)
        for step_experts, step_gaps in zip(generation.routed_experts, generation.router_gaps):
            for layers, gaps in zip(step_experts, step_gaps):
                assert [len(set(ids)) for ids in layers] == [top_k] * moe_layers  # distinct: each a real choice
                assert all(0 <= e < num_experts for ids in layers for e in ids)
                assert len(gaps) == moe_layers and min(gaps) >= 0


@pytest.mark.parametrize("mode", MODES)
def test_replaying_the_engines_own_experts_changes_nothing(engines, mode):
    engine = engines("qwen2_moe", mode)
    free = engine.generate(REQUESTS)
    assert records(engine.generate(replaying(REQUESTS, free))) == records(free)


@pytest.mark.parametrize("mode", MODES)
def test_replayed_experts_are_computed_with_and_the_routers_own_choice_is_recorded(engines, mode):
    engine = engines("qwen2_moe", mode)
    free = engine.generate(REQUESTS)
    _, _, num_experts = engine.model_runner.routing_shape
    replayed = engine.generate(replaying(REQUESTS, free, expert=lambda e: (e + 1) % num_experts))
    assert all(r.top_logprobs[0] != f.top_logprobs[0] for r, f in zip(replayed, free))
    # The first MoE layer's router sees the prompt before any expert ran: its own choice is unchanged.
    assert [[fed[0] for fed in r.routed_experts[0]] for r in replayed] == [[fed[0] for fed in f.routed_experts[0]]
                                                                          for f in free]


@pytest.mark.parametrize("prefill_graphs", [False, True], ids=["decode-graphs", "prefill-graphs"])
def test_graph_mode_replays_experts_exactly_as_eager(engines, prefill_graphs):
    eager = engines("qwen2_moe", "eager", "bfloat16", prefill_graphs)
    requests = replaying(with_forced_tokens(REQUESTS), eager.generate(REQUESTS), expert=lambda e: 3 - e)
    graph = engines("qwen2_moe", "graph", "bfloat16", prefill_graphs)
    before = (graph.stats.graph_steps, graph.stats.prefill_graph_steps)
    assert records(graph.generate(requests)) == records(eager.generate(requests))
    after = (graph.stats.graph_steps, graph.stats.prefill_graph_steps)
    assert after[0] > before[0] and (after[1] > before[1]) == prefill_graphs


ROUTE = [[0, 1], [2, 3]]  # one position: two MoE layers, two experts each


@pytest.mark.parametrize(("forced_experts", "message"), [
    ([[[0, 1]]], "forced_experts at position 0 must be 2 MoE layers of 2 distinct expert ids in [0, 4), got [[0, 1]]"),
    ([ROUTE, [[0, 1], [2, 2]]], "forced_experts at position 1 must be 2 MoE layers of 2 distinct expert ids"),
    ([[[0, 1], [2, 4]]], "forced_experts at position 0 must be 2 MoE layers of 2 distinct expert ids"),
    ([ROUTE] * 6, "forced_experts for 6 positions, but it feeds 5"),
])
def test_forced_experts_of_another_shape_than_the_models_routing_are_refused(engines, forced_experts, message):
    engine = engines("qwen2_moe", "eager")
    assert engine.model_runner.routing_shape == (2, 2, 4)
    with pytest.raises(InvalidRequest, match=re.escape(f"request 'bad': {message}")):
        engine.validate(Request("bad", [1, 2, 3], 3, forced_experts=forced_experts))


def test_forced_experts_for_fewer_positions_than_fed_are_accepted(engines):
    engine = engines("qwen2_moe", "eager")
    engine.validate(Request("prompt only", [1, 2, 3], 3, forced_experts=[ROUTE] * 3))
