"""The transformers oracle: greedy, exactly max_new_tokens, top-k logprobs of the raw logits; and scoring of
given sequences, one teacher-forced forward per batch, with its MoE routing."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from harness.inputs.checkpoints import ensure_checkpoint
from harness.inputs.oracle import oracle_generate, oracle_score
from harness.verdicts.routing import router_gaps
from reference_runner.records import Generation, Request

REQUESTS = [Request("short", [3], 6), Request("long", list(range(10, 40)), 9)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return ensure_checkpoint("qwen2_moe", tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def generations(checkpoint):
    return oracle_generate(checkpoint, REQUESTS, top_k=4)


def test_each_request_gets_exactly_max_new_tokens(generations):
    assert [g.rid for g in generations] == ["short", "long"]
    assert [(len(g.output_ids), len(g.top_logprobs), len(g.graph_steps)) for g in generations] == [(6, 6, 6), (9, 9, 9)]
    assert not any(step for g in generations for step in g.graph_steps)


def test_each_step_records_top_k_best_first_led_by_the_chosen_token(generations):
    for g in generations:
        for token, top in zip(g.output_ids, g.top_logprobs):
            logprobs = [logprob for _, logprob in top]
            assert len(top) == 4 and logprobs == sorted(logprobs, reverse=True)
            assert top[0][0] == token


def test_logprobs_are_the_log_softmax_of_a_full_forward_over_the_context(checkpoint, generations):
    # Recomputing every step without a KV cache checks the oracle's cache handling as well.
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    for request, g in zip(REQUESTS, generations):
        with torch.no_grad():
            logits = model(torch.tensor([request.prompt_ids + g.output_ids[:-1]])).logits[0]
        logprobs = torch.log_softmax(logits[len(request.prompt_ids) - 1:], dim=-1)
        for step, top in enumerate(g.top_logprobs):
            assert [t for t, _ in top] == logprobs[step].topk(4).indices.tolist()
            assert [lp for _, lp in top] == pytest.approx(logprobs[step].topk(4).values.tolist(), abs=1e-4)


def test_requests_do_not_influence_each_other(checkpoint, generations):
    (alone,) = oracle_generate(checkpoint, REQUESTS[1:], top_k=4)
    assert alone == generations[1]


def test_eos_does_not_stop_decoding(tmp_path, generations):
    first = generations[0].output_ids[0]
    checkpoint = ensure_checkpoint("qwen2_moe", tmp_path, eos_token_id=first)  # same weights, new EOS
    (g,) = oracle_generate(checkpoint, REQUESTS[:1], top_k=4)
    assert g.output_ids == generations[0].output_ids and g.output_ids[0] == first


def test_scoring_the_oracles_own_tokens_gives_back_its_distributions(checkpoint, generations):
    scored = oracle_score(checkpoint, REQUESTS, generations, top_k=4)
    for g, s in zip(generations, scored):
        assert (s.rid, s.output_ids, s.forced_from) == (g.rid, g.output_ids, 0)
        for top, expected in zip(s.top_logprobs, g.top_logprobs):
            assert [t for t, _ in top] == [t for t, _ in expected]
            assert [lp for _, lp in top] == pytest.approx([lp for _, lp in expected], abs=1e-4)


def test_scoring_in_a_right_padded_batch_equals_scoring_alone(checkpoint, generations):
    (alone,) = oracle_score(checkpoint, REQUESTS[:1], generations[:1], top_k=4)
    batched = oracle_score(checkpoint, REQUESTS, generations, top_k=4)[0]  # padded to the long request
    assert alone.output_ids == batched.output_ids
    for top, other in zip(alone.top_logprobs, batched.top_logprobs):
        assert [t for t, _ in top] == [t for t, _ in other]
        assert [lp for _, lp in top] == pytest.approx([lp for _, lp in other], abs=1e-5)


def test_scored_routing_is_transformers_choice_at_every_fed_position(checkpoint, generations):
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    top_k = model.config.num_experts_per_tok
    for request, g, s in zip(REQUESTS, generations, oracle_score(checkpoint, REQUESTS, generations)):
        sequence = request.prompt_ids + g.output_ids[:-1]
        assert [len(fed) for fed in s.routed_experts] == [len(request.prompt_ids)] + [1] * (len(g.output_ids) - 1)
        with torch.no_grad():
            layers = model(torch.tensor([sequence]), output_router_logits=True).router_logits
        expected = [[torch.softmax(layer[p].float(), -1).topk(top_k).indices.tolist() for layer in layers]
                    for p in range(len(sequence))]
        assert [position for fed in s.routed_experts for position in fed] == expected
        gaps = [min(position) for fed in s.router_gaps for position in fed]  # the smallest over MoE layers
        assert gaps == pytest.approx(router_gaps(checkpoint, [sequence])[0], abs=1e-5)


def test_a_rejected_or_wrong_length_generation_is_not_scored(checkpoint, generations):
    rejected = Generation("short", error="rejected")
    short = Generation("long", output_ids=generations[1].output_ids[:3], top_logprobs=generations[1].top_logprobs[:3],
                       graph_steps=[False] * 3)
    assert oracle_score(checkpoint, REQUESTS, [rejected, short]) == [Generation("short", forced_from=0),
                                                                      Generation("long", forced_from=0)]
