"""Verdicts of the token-by-token comparison on hand-built generations."""
import pytest
import torch

from harness.verdicts.compare import Verdict, compare_generation, compare_generations, summarize
from harness.verdicts.routing import RoutingTie, first_routing_tie
from harness.verdicts.tolerances import Tolerance
from reference_runner.records import Generation

TOL = Tolerance(logprob_atol=0.01, tie_margin=0.1)


def gen(*steps: list[tuple[int, float]], rid: str = "r0") -> Generation:
    """A greedy generation whose step i chose the best token of top-k list `steps[i]`."""
    generation = Generation(rid)
    for top in steps:
        generation.append(top[0][0], top, in_graph=False)
    return generation


def test_identical_generations_match():
    baseline = gen([(5, -0.5), (6, -1.5)], [(7, -0.25), (8, -2.0)])
    verdict = compare_generation(baseline, gen(*baseline.top_logprobs), tolerance=TOL)
    assert verdict == Verdict("r0", "match", "all 2 tokens match; largest logprob difference 0")
    assert verdict.passed


def test_logprob_difference_within_tolerance_matches_and_is_reported():
    baseline = gen([(5, -0.5), (6, -1.5)])
    verdict = compare_generation(baseline, gen([(5, -0.5), (6, -1.5078125)]), tolerance=TOL)
    assert (verdict.status, verdict.max_logprob_diff) == ("match", 0.0078125)


def test_logprob_drift_on_identical_tokens_is_a_mismatch_at_the_first_step_beyond_tolerance():
    baseline = gen([(5, -0.5), (6, -1.5)], [(7, -0.25), (8, -2.0)], [(9, -0.25), (8, -2.0)])
    test = gen([(5, -0.5), (6, -1.5)], [(7, -0.25), (8, -2.03125)], [(9, -0.25), (8, -2.5)])
    verdict = compare_generation(baseline, test, tolerance=TOL)
    assert (verdict.status, verdict.step, verdict.max_logprob_diff) == ("mismatch", 1, 0.03125)
    assert verdict.reason == "step 1: same token 7, but logprobs drifted by 0.0312 > 0.01"


def test_drift_counts_only_tokens_ranked_by_both_sides():
    baseline = gen([(5, -0.5), (6, -1.5)])
    test = gen([(5, -0.5), (9, -1.0)])  # 6 and 9 each appear on one side only
    assert compare_generation(baseline, test, tolerance=TOL).status == "match"


def test_near_tie_with_cross_ranked_tokens_is_a_tie():
    baseline = gen([(5, -0.5), (6, -1.5)], [(7, -0.70), (8, -0.75)])
    test = gen([(5, -0.5), (6, -1.5)], [(8, -0.72), (7, -0.73)])
    verdict = compare_generation(baseline, test, tolerance=TOL)
    assert verdict == Verdict(
        "r0", "tie",
        "step 1: baseline chose 7 (-0.7000), test chose 8 (-0.7200); the baseline top-2 margin 0.05 is below "
        "the tie margin 0.1 and each token is in the other's top-k: a near-tie, comparison stops here",
        step=1, baseline_token=7, test_token=8, baseline_logprob=-0.70, test_logprob=-0.72, margin=pytest.approx(0.05),
    )
    assert verdict.passed


def test_comparison_stops_at_a_tie():
    baseline = gen([(7, -0.70), (8, -0.75)], [(1, -0.1), (2, -5.0)])
    test = gen([(8, -0.72), (7, -0.73)], [(3, -0.1), (4, -5.0)])  # decisively different after the tie
    assert compare_generation(baseline, test, tolerance=TOL).status == "tie"


def test_divergence_with_a_large_margin_is_a_mismatch():
    baseline = gen([(7, -0.1), (8, -3.0)])
    test = gen([(8, -0.1), (7, -3.0)])
    verdict = compare_generation(baseline, test, tolerance=TOL)
    assert (verdict.status, verdict.step, verdict.baseline_token, verdict.test_token) == ("mismatch", 0, 7, 8)
    assert (verdict.baseline_logprob, verdict.test_logprob, verdict.margin) == (-0.1, -0.1, pytest.approx(2.9))
    assert verdict.reason.endswith("margin 2.9 is at least the tie margin 0.1: a decisive divergence")
    assert not verdict.passed


def test_divergence_with_a_small_margin_is_a_mismatch_when_a_token_is_unranked_by_the_other_side():
    baseline = gen([(7, -0.70), (8, -0.75)])
    test = gen([(9, -0.2), (7, -3.0)])  # test's token 9 is not in the baseline's top-k
    verdict = compare_generation(baseline, test, tolerance=TOL)
    assert verdict.status == "mismatch"
    assert verdict.reason.endswith("below the tie margin 0.1, but test token 9 is not in the baseline's top-k")


def test_different_lengths_are_a_mismatch():
    baseline = gen([(5, -0.5), (6, -1.5)], [(7, -0.25), (8, -2.0)])
    verdict = compare_generation(baseline, gen([(5, -0.5), (6, -1.5)]), tolerance=TOL)
    assert (verdict.status, verdict.reason) == ("mismatch", "test produced 1 tokens, baseline 2")


def test_a_tie_does_not_excuse_a_wrong_length():
    baseline = gen([(7, -0.70), (8, -0.75)], [(1, -0.1), (2, -5.0)])
    test = gen([(8, -0.72), (7, -0.73)])
    assert compare_generation(baseline, test, tolerance=TOL).status == "mismatch"


def test_a_token_that_is_not_its_own_top1_is_an_inconsistent_record():
    baseline = gen([(5, -0.5), (6, -1.5)])
    test = Generation("r0", output_ids=[6], top_logprobs=[[(5, -0.5), (6, -1.5)]], graph_steps=[True])
    verdict = compare_generation(baseline, test, tolerance=TOL)
    assert (verdict.status, verdict.step) == ("mismatch", 0)
    assert verdict.reason.startswith("step 0: test token 6 is not its own top-1 (5 at -0.5000)")


def test_an_exact_tie_for_first_place_may_be_listed_in_either_order():
    baseline = gen([(5, -0.75), (6, -0.75)])
    test = Generation("r0", output_ids=[5], top_logprobs=[[(6, -0.75), (5, -0.75)]], graph_steps=[False])
    assert compare_generation(baseline, test, tolerance=TOL).status == "match"


def test_a_rejected_request_is_a_mismatch_naming_the_error():
    test = Generation("r0", error="prompt longer than max_context 64")
    verdict = compare_generation(gen([(5, -0.5), (6, -1.5)]), test, tolerance=TOL)
    assert verdict == Verdict("r0", "mismatch", "test rejected the request: prompt longer than max_context 64")


def test_generations_are_paired_by_rid():
    baseline = [gen([(5, -0.5), (6, -1.5)], rid="a"), gen([(7, -0.5), (8, -1.5)], rid="b")]
    test = [gen([(7, -0.5), (8, -1.5)], rid="b"), gen([(5, -0.5), (6, -1.5)], rid="a")]
    verdicts = compare_generations(baseline, test, TOL)
    assert [(v.rid, v.status) for v in verdicts] == [("a", "match"), ("b", "match")]


def test_a_request_missing_on_either_side_is_a_mismatch():
    baseline = [gen([(5, -0.5), (6, -1.5)], rid="a")]
    test = [gen([(5, -0.5), (6, -1.5)], rid="b")]
    verdicts = compare_generations(baseline, test, TOL)
    assert [(v.rid, v.status, v.reason) for v in verdicts] == [
        ("a", "mismatch", "expected one generation per side, found no test generations"),
        ("b", "mismatch", "expected one generation per side, found no baseline generations"),
    ]


def test_a_request_answered_twice_is_a_mismatch():
    baseline = [gen([(5, -0.5), (6, -1.5)], rid="a")]
    verdicts = compare_generations(baseline, baseline * 2, TOL)
    assert [(v.status, v.reason) for v in verdicts] == [
        ("mismatch", "expected one generation per side, found 2 test generations"),
    ]


def test_summarize_counts_every_status():
    verdicts = [Verdict("a", "match", ""), Verdict("b", "tie", ""), Verdict("c", "match", "")]
    assert summarize(verdicts) == {"match": 2, "tie": 1, "mismatch": 0}


def test_tolerances_per_dtype_for_the_same_kernels():
    assert Tolerance.for_dtype(torch.float32) == Tolerance(logprob_atol=1e-3, tie_margin=1e-2)
    assert Tolerance.for_dtype(torch.float16) == Tolerance(logprob_atol=0.07, tie_margin=0.1)
    assert Tolerance.for_dtype(torch.bfloat16) == Tolerance(logprob_atol=0.5, tie_margin=0.3)


def test_tolerances_per_dtype_across_kernels_add_a_router_gap():
    across = {dtype: Tolerance.for_dtype(dtype, across_kernels=True)
              for dtype in (torch.float32, torch.float16, torch.bfloat16)}
    assert across == {
        torch.float32: Tolerance(logprob_atol=1e-3, tie_margin=1e-2, router_gap=1e-3),
        torch.float16: Tolerance(logprob_atol=0.2, tie_margin=0.1, router_gap=0.05),
        torch.bfloat16: Tolerance(logprob_atol=1.0, tie_margin=0.75, router_gap=0.4),
    }


# A decisive divergence at step 2: token 9 where the baseline chose 7 by a margin of 4.
DECISIVE_REF = gen([(5, -0.5), (6, -1.5)], [(5, -0.5), (6, -1.5)], [(7, -0.1), (8, -4.1)])
DECISIVE_TEST = gen([(5, -0.5), (6, -1.5)], [(5, -0.5), (6, -1.5)], [(9, -0.2), (7, -3.0)])
ROUTED = Tolerance(logprob_atol=0.01, tie_margin=0.1, router_gap=0.2)


def test_first_routing_tie_is_the_first_position_below_the_router_gap():
    # Prompt of 3 tokens: position 4 is output token 1, whose hidden state step 2 reads first.
    assert first_routing_tie([0.9, 0.5, 0.3, 0.25, 0.15, 0.01], prompt_len=3, router_gap=0.2) == RoutingTie(4, 0.15, 2)
    assert first_routing_tie([0.9, 0.05], prompt_len=3, router_gap=0.2) == RoutingTie(1, 0.05, 0)
    assert first_routing_tie([0.9, 0.5], prompt_len=1, router_gap=0.2) is None


def test_a_divergence_after_a_routing_tie_is_a_tie_naming_the_token_and_gap():
    verdict = compare_generation(DECISIVE_REF, DECISIVE_TEST, tolerance=ROUTED, routing_tie=RoutingTie(4, 0.15, 2))
    assert (verdict.status, verdict.step) == ("tie", 2)
    assert verdict.reason.endswith(
        "a decisive divergence; but token 4 had a router gap of 0.15 < 0.2, so the kernels may route differently "
        "from step 2 on: a routing near-tie, comparison stops here")


def test_a_divergence_before_the_routing_tie_is_still_a_mismatch():
    verdict = compare_generation(DECISIVE_REF, DECISIVE_TEST, tolerance=ROUTED, routing_tie=RoutingTie(5, 0.15, 3))
    assert (verdict.status, verdict.step) == ("mismatch", 2)


def test_a_routing_tie_never_excuses_an_inconsistent_record():
    test = gen([(5, -0.5), (6, -1.5)], [(5, -0.5), (6, -1.5)], [(7, -0.1), (8, -4.1)])
    test.output_ids[2] = 8  # the recorded token is not its own top-1
    verdict = compare_generation(DECISIVE_REF, test, tolerance=ROUTED, routing_tie=RoutingTie(0, 0.01, 0))
    assert verdict.status == "mismatch"
    assert "the record is inconsistent" in verdict.reason


def test_a_routing_tie_never_excuses_a_wrong_token_count():
    short = gen(*DECISIVE_TEST.top_logprobs[:2])
    verdict = compare_generation(DECISIVE_REF, short, tolerance=ROUTED, routing_tie=RoutingTie(0, 0.01, 0))
    assert (verdict.status, verdict.reason) == ("mismatch", "test produced 2 tokens, baseline 3")


def test_routing_ties_are_applied_by_rid():
    baseline = [gen(*DECISIVE_REF.top_logprobs, rid="a"), gen(*DECISIVE_REF.top_logprobs, rid="b")]
    test = [gen(*DECISIVE_TEST.top_logprobs, rid="a"), gen(*DECISIVE_TEST.top_logprobs, rid="b")]
    verdicts = compare_generations(baseline, test, ROUTED, routing_ties={"b": RoutingTie(0, 0.01, 0)})
    assert [(v.rid, v.status) for v in verdicts] == [("a", "mismatch"), ("b", "tie")]


def test_a_dtype_without_a_tolerance_is_refused():
    with pytest.raises(ValueError, match=r"no tolerance for torch\.int8"):
        Tolerance.for_dtype(torch.int8)
