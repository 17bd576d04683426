"""Verdicts of the token-by-token comparison on hand-built generations: the per-step rules, the segments past a
near-tie (a re-run forced in the loop with the baseline's tokens, or both sides continued from them), MoE routing,
and how much each verdict compared."""
import dataclasses

import pytest
import torch

from harness.verdicts.compare import (
    Segment,
    Verdict,
    compare_generation,
    compare_generations,
    coverage,
    length_problems,
    splice,
    summarize,
)
from harness.verdicts.routing import RoutingTie, first_routing_tie
from harness.verdicts.tolerances import EXACT, Tolerance
from reference_runner.records import Generation, Request

TOL = Tolerance(logprob_atol=0.01, tie_margin=0.1)


def gen(*steps: list[tuple[int, float]], rid: str = "r0") -> Generation:
    """A greedy generation whose step i chose the best token of top-k list `steps[i]`."""
    generation = Generation(rid)
    for top in steps:
        generation.append(top[0][0], top, in_graph=False)
    return generation


def forced(generation: Generation, tokens: list[int], from_step: int) -> Generation:
    """`generation`'s distributions, with `tokens` fed from step `from_step` on (as a forced run records them)."""
    return dataclasses.replace(generation, output_ids=generation.output_ids[:from_step] + tokens, forced_from=from_step)


def in_loop(baseline: Generation, rerun: Generation, start: int) -> list[Segment]:
    """The segment of `rerun`, the test forced in its loop, from step `start` on."""
    return [Segment(start, baseline, rerun, "in_loop")]


A = [(5, -0.5), (6, -1.5)]
B = [(7, -0.25), (8, -2.0)]
NEAR = [(7, -0.700), (8, -0.705)]  # margin 0.005
FLIPPED = [(8, -0.702), (7, -0.703)]  # the same two tokens, within 0.01 of NEAR, the other way round


def test_identical_generations_match_and_compare_every_step():
    baseline = gen(A, B)
    verdict = compare_generation(baseline, gen(A, B), tolerance=TOL)
    assert verdict == Verdict("r0", "match", "all 2 tokens match; largest logprob difference 0", compared=2, generated=2)
    assert verdict.passed


def test_logprob_difference_within_tolerance_matches_and_is_reported():
    verdict = compare_generation(gen(A), gen([(5, -0.5), (6, -1.5078125)]), tolerance=TOL)
    assert (verdict.status, verdict.max_logprob_diff) == ("match", 0.0078125)


def test_logprob_drift_on_identical_tokens_is_a_mismatch_at_the_first_step_beyond_tolerance():
    baseline = gen(A, [(7, -0.25), (8, -2.0)], [(9, -0.25), (8, -2.0)])
    test = gen(A, [(7, -0.25), (8, -2.03125)], [(9, -0.25), (8, -2.5)])
    verdict = compare_generation(baseline, test, tolerance=TOL)
    assert (verdict.status, verdict.step, verdict.max_logprob_diff, verdict.compared) == ("mismatch", 1, 0.03125, 1)
    assert verdict.reason == "step 1: logprobs of a token both sides rank drifted by 0.0312 > 0.01"


def test_drift_counts_only_tokens_ranked_by_both_sides():
    assert compare_generation(gen(A), gen([(5, -0.5), (9, -1.0)]), tolerance=TOL).status == "match"


def test_near_tie_with_cross_ranked_tokens_is_a_tie_that_stops_a_free_run_where_the_tokens_part():
    verdict = compare_generation(gen(A, NEAR, B), gen(A, FLIPPED, B), tolerance=TOL)
    assert verdict == Verdict(
        "r0", "tie",
        "step 1: baseline chose 7 (-0.7000), test chose 8 (-0.7020); the baseline top-2 margin 0.005 is below the tie "
        "margin 0.1 and each token is in the other's top-k: a near-tie, after which the two sides feed different "
        "tokens; comparison stops here (2 of 3 steps compared)",
        step=1, baseline_token=7, test_token=8, baseline_logprob=-0.70, test_logprob=-0.702,
        margin=pytest.approx(0.005), max_logprob_diff=pytest.approx(0.003), compared=2, generated=3, ties=1,
        resume_from=2, force_from=1,
    )
    assert verdict.passed


def test_a_near_tie_whose_margin_exceeds_the_drift_tolerance_is_a_mismatch():
    # Flipping two tokens 0.05 apart moves their logprobs by at least 0.025: more than logprob_atol allows.
    verdict = compare_generation(gen([(7, -0.70), (8, -0.75)]), gen([(8, -0.72), (7, -0.73)]), tolerance=TOL)
    assert verdict.reason == "step 0: logprobs of a token both sides rank drifted by 0.03 > 0.01"


def test_without_a_continuation_nothing_after_the_tie_is_compared():
    baseline = gen(NEAR, [(1, -0.1), (2, -5.0)])
    test = gen(FLIPPED, [(3, -0.1), (4, -5.0)])  # decisively different after the tie
    verdict = compare_generation(baseline, test, tolerance=TOL)
    assert (verdict.status, verdict.compared, verdict.generated, verdict.force_from) == ("tie", 1, 2, 0)


def test_a_continuation_compares_every_step_after_the_tie():
    baseline = gen(A, NEAR, B, A)
    test = gen(A, FLIPPED, [(3, -0.1), (4, -5.0)], A)
    continuation = forced(gen(A, FLIPPED, B, A), [7, 7, 5], from_step=1)
    verdict = compare_generation(baseline, test, tolerance=TOL, segments=in_loop(baseline, continuation, 2))
    assert (verdict.status, verdict.compared, verdict.generated, verdict.ties, verdict.step) == ("tie", 4, 4, 1, 1)
    assert (verdict.force_from, verdict.resume_from, verdict.continued_by) == (None, None, ["in_loop"])
    assert verdict.reason.startswith("all 4 steps compared: 1 near-tie(s), 0 router near-tie(s), largest logprob "
                                     "difference 0.003; the first at step 1: baseline chose 7")


def test_a_decisive_divergence_after_the_tie_is_a_mismatch():
    baseline = gen(A, NEAR, B, A)
    test = gen(A, FLIPPED, B, A)
    continuation = forced(gen(A, FLIPPED, B, [(6, -0.1), (5, -3.0)]), [7, 7, 5], from_step=1)
    verdict = compare_generation(baseline, test, tolerance=TOL, segments=in_loop(baseline, continuation, 2))
    assert (verdict.status, verdict.step, verdict.compared) == ("mismatch", 3, 3)
    assert verdict.reason.startswith("step 3: baseline chose 5 (-0.5000), test chose 6 (-0.1000)")


def test_near_ties_after_the_first_are_counted_not_stopped_at():
    baseline = gen(NEAR, A, NEAR, A)
    test = gen(FLIPPED, A, NEAR, A)
    continuation = forced(gen(FLIPPED, A, FLIPPED, A), [7, 5, 7, 5], from_step=0)
    verdict = compare_generation(baseline, test, tolerance=TOL, segments=in_loop(baseline, continuation, 1))
    assert (verdict.status, verdict.compared, verdict.ties, verdict.step) == ("tie", 4, 2, 0)


@pytest.mark.parametrize(("continuation", "problem"), [
    (forced(gen(A, FLIPPED, B), [8, 7], from_step=1), "fed token 8 at step 1, not the baseline's 7"),
    (forced(gen(B, FLIPPED, B), [7, 7], from_step=1), "chose token 7 at step 0, where the first run chose 5 on the "
                                                      "same inputs"),
    (forced(gen(A, FLIPPED, B), [5, 7, 7], from_step=0), "says it was forced from step 0"),
    (Generation("r0", error="forced_ids of the wrong length"), "was rejected: forced_ids of the wrong length"),
])
def test_a_continuation_that_did_not_run_on_the_baseline_tokens_is_a_mismatch(continuation, problem):
    baseline = gen(A, NEAR, B)
    verdict = compare_generation(baseline, gen(A, FLIPPED, B), tolerance=TOL, segments=in_loop(baseline, continuation, 2))
    assert (verdict.status, verdict.reason) == ("mismatch", f"step 1: the re-run forced from step 1 {problem}")


def test_against_a_baseline_scored_on_the_test_tokens_every_step_is_compared():
    # The oracle scores the test's own sequence: its top-1 is its choice, the tokens are the test's.
    test = gen(A, FLIPPED, A)
    baseline = forced(gen(A, NEAR, A), test.output_ids, from_step=0)
    verdict = compare_generation(baseline, test, tolerance=TOL)
    assert (verdict.status, verdict.compared, verdict.ties, verdict.baseline_token, verdict.test_token) == (
        "tie", 3, 1, 7, 8)


def test_a_test_token_the_scoring_baseline_would_not_choose_is_a_mismatch():
    test = gen(A, [(8, -0.1), (7, -3.0)], A)
    baseline = forced(gen(A, [(7, -0.1), (8, -3.0)], A), test.output_ids, from_step=0)
    verdict = compare_generation(baseline, test, tolerance=TOL)
    assert (verdict.status, verdict.step, verdict.baseline_token, verdict.test_token) == ("mismatch", 1, 7, 8)


def test_sides_that_feed_different_tokens_without_a_near_tie_are_a_mismatch():
    verdict = compare_generation(gen(A, B), forced(gen(A, B), [9, 9], from_step=0), tolerance=TOL)
    assert (verdict.status, verdict.compared) == ("mismatch", 1)
    assert verdict.reason == "step 0: baseline fed token 5, test 9, but neither chose it on a near-tie"


def test_a_forced_side_is_judged_by_its_own_choice_not_by_the_token_it_was_fed():
    scored = forced(gen(A, B), [5, 7], from_step=0)
    scored.top_logprobs[1] = [(9, -0.25), (8, -2.0)]  # its own choice (9) is not the token it was fed (7)
    verdict = compare_generation(scored, gen(A, B), tolerance=TOL)
    assert verdict.reason.startswith("step 1: baseline chose 9 (-0.2500), test chose 7 (-0.2500)")


def test_divergence_with_a_large_margin_is_a_mismatch():
    verdict = compare_generation(gen([(7, -0.1), (8, -3.0)]), gen([(8, -0.1), (7, -3.0)]), tolerance=TOL)
    assert (verdict.status, verdict.step, verdict.baseline_token, verdict.test_token) == ("mismatch", 0, 7, 8)
    assert (verdict.baseline_logprob, verdict.test_logprob, verdict.margin) == (-0.1, -0.1, pytest.approx(2.9))
    assert verdict.reason.endswith("margin 2.9 is at least the tie margin 0.1: a decisive divergence")
    assert not verdict.passed


def test_divergence_with_a_small_margin_is_a_mismatch_when_a_token_is_unranked_by_the_other_side():
    verdict = compare_generation(gen(NEAR), gen([(9, -0.2), (7, -3.0)]), tolerance=TOL)
    assert verdict.status == "mismatch"
    assert verdict.reason.endswith("below the tie margin 0.1, but test token 9 is not in the baseline's top-k")


def test_different_lengths_are_a_mismatch():
    verdict = compare_generation(gen(A, B), gen(A), tolerance=TOL)
    assert (verdict.status, verdict.reason, verdict.generated) == ("mismatch", "test produced 1 tokens, baseline 2", 2)


def test_a_tie_does_not_excuse_a_wrong_length():
    assert compare_generation(gen(NEAR, [(1, -0.1), (2, -5.0)]), gen(FLIPPED), tolerance=TOL).status == "mismatch"


def test_a_token_that_is_not_its_own_top1_is_an_inconsistent_record():
    test = Generation("r0", output_ids=[6], top_logprobs=[A], graph_steps=[True])
    verdict = compare_generation(gen(A), test, tolerance=TOL)
    assert (verdict.status, verdict.step) == ("mismatch", 0)
    assert verdict.reason.startswith("step 0: test token 6 is not its own top-1 (5 at -0.5000)")


def test_an_exact_tie_for_first_place_may_be_listed_in_either_order():
    test = Generation("r0", output_ids=[5], top_logprobs=[[(6, -0.75), (5, -0.75)]], graph_steps=[False])
    assert compare_generation(gen([(5, -0.75), (6, -0.75)]), test, tolerance=TOL).status == "match"


def test_a_rejected_request_is_a_mismatch_naming_the_error():
    test = Generation("r0", error="prompt longer than max_context 64")
    verdict = compare_generation(gen(A), test, tolerance=TOL)
    assert verdict == Verdict("r0", "mismatch", "test rejected the request: prompt longer than max_context 64",
                              generated=1)


def test_generations_are_paired_by_rid():
    baseline = [gen(A, rid="a"), gen(B, rid="b")]
    verdicts = compare_generations(baseline, [gen(B, rid="b"), gen(A, rid="a")], TOL)
    assert [(v.rid, v.status) for v in verdicts] == [("a", "match"), ("b", "match")]


def test_a_request_missing_on_either_side_is_a_mismatch():
    verdicts = compare_generations([gen(A, rid="a")], [gen(A, rid="b")], TOL)
    assert [(v.rid, v.status, v.reason) for v in verdicts] == [
        ("a", "mismatch", "expected one generation per side, found no test generations"),
        ("b", "mismatch", "expected one generation per side, found no baseline generations"),
    ]


def test_a_request_answered_twice_is_a_mismatch():
    verdicts = compare_generations([gen(A, rid="a")], [gen(A, rid="a")] * 2, TOL)
    assert [(v.status, v.reason) for v in verdicts] == [
        ("mismatch", "expected one generation per side, found 2 test generations"),
    ]


def test_continuations_are_applied_by_rid():
    baseline = [gen(A, NEAR, B, rid="a"), gen(A, NEAR, B, rid="b")]
    test = [gen(A, FLIPPED, B, rid="a"), gen(A, FLIPPED, B, rid="b")]
    continuation = dataclasses.replace(forced(gen(A, FLIPPED, B), [7, 7], from_step=1), rid="b")
    verdicts = compare_generations(baseline, test, TOL, segments={"b": in_loop(baseline[1], continuation, 2)})
    assert [(v.rid, v.compared, v.resume_from, v.force_from) for v in verdicts] == [("a", 2, 2, 1), ("b", 3, None, None)]


def test_a_continuation_compares_both_sides_from_the_baseline_tokens_before_it():
    baseline, test = gen(A, NEAR, B, A), gen(A, FLIPPED, [(3, -0.1), (4, -5.0)], A)  # parted after the tie
    segment = Segment(2, splice(baseline, 2, gen(B, A)), splice(test, 2, gen(B, [(5, -0.5), (6, -1.5078125)])),
                      "continuation")
    verdict = compare_generation(baseline, test, tolerance=TOL, segments=[segment])
    assert (verdict.status, verdict.compared, verdict.ties, verdict.continued_by) == ("tie", 4, 1, ["continuation"])
    assert verdict.max_logprob_diff == 0.0078125


def test_continuations_carry_the_comparison_past_each_later_near_tie():
    baseline, test = gen(NEAR, A, NEAR, A), gen(FLIPPED, A, NEAR, A)
    first = Segment(1, splice(baseline, 1, gen(A, NEAR, A)), splice(test, 1, gen(A, FLIPPED, B)), "continuation")
    verdict = compare_generation(baseline, test, tolerance=TOL, segments=[first])
    assert (verdict.compared, verdict.resume_from) == (3, 3)  # stopped at the second near-tie
    second = Segment(3, splice(first.baseline, 3, gen(A)), splice(first.test, 3, gen(A)), "continuation")
    verdict = compare_generation(baseline, test, tolerance=TOL, segments=[first, second])
    assert (verdict.status, verdict.compared, verdict.ties, verdict.resume_from) == ("tie", 4, 2, None)
    assert verdict.continued_by == ["continuation", "continuation"]


def test_a_continuation_that_does_not_follow_the_baseline_tokens_is_a_mismatch():
    baseline, test = gen(A, NEAR, B), gen(A, FLIPPED, B)
    astray = Segment(2, splice(gen(B, NEAR, B), 2, gen(B)), splice(test, 2, gen(B)), "continuation")
    verdict = compare_generation(baseline, test, tolerance=TOL, segments=[astray])
    assert (verdict.status, verdict.reason) == ("mismatch", "step 2: the continuation from step 2 does not follow the "
                                                            "baseline's tokens before step 2")


def test_a_stop_at_the_last_step_leaves_nothing_to_continue():
    verdict = compare_generation(gen(A, NEAR), gen(A, FLIPPED), tolerance=TOL)
    assert (verdict.status, verdict.compared, verdict.generated, verdict.resume_from) == ("tie", 2, 2, None)


def test_splice_keeps_the_steps_before_the_start_and_appends_the_continuation():
    spliced = splice(gen(A, NEAR, B), 2, gen(A, B))
    assert (spliced.output_ids, spliced.top_logprobs, spliced.forced_from) == ([5, 7, 5, 7], [A, NEAR, A, B], None)


def test_summarize_counts_every_status():
    verdicts = [Verdict("a", "match", ""), Verdict("b", "tie", ""), Verdict("c", "match", "")]
    assert summarize(verdicts) == {"match": 2, "tie": 1, "mismatch": 0}


def test_coverage_sums_steps_compared_and_generated():
    verdicts = [Verdict("a", "match", "", compared=32, generated=32), Verdict("b", "tie", "", compared=5, generated=25)]
    assert coverage(verdicts) == (37, 57)


def test_a_generation_of_another_length_than_asked_for_is_a_mismatch():
    requests = [Request("a", [1], 2), Request("b", [1], 3), Request("c", [1], 2)]
    generations = [gen(A, B, rid="a"), gen(A, B, rid="b"), Generation("c", error="rejected")]
    assert length_problems(requests, generations) == {
        "b": Verdict("b", "mismatch", "test produced 2 tokens, the request asks for 3", generated=3)}


# --- exact tolerance: the same kernels ---------------------------------------------------------------------

def test_under_the_exact_tolerance_any_logprob_difference_is_a_mismatch():
    verdict = compare_generation(gen(A), gen([(5, -0.5), (6, -1.5000001)]), tolerance=EXACT)
    assert verdict.reason == "step 0: logprobs of a token both sides rank drifted by 1e-07 > 0"


def test_under_the_exact_tolerance_any_other_token_is_a_mismatch():
    verdict = compare_generation(gen([(5, -0.5), (6, -0.5000001)]), gen([(6, -0.5), (5, -0.5000001)]), tolerance=EXACT)
    assert verdict.reason.endswith("margin 1e-07 is at least the tie margin 0: a decisive divergence")


def test_under_the_exact_tolerance_any_other_expert_is_a_mismatch():
    baseline = routed(gen(A), [PROMPT_EXPERTS], [[[0.01, 0.01], [0.01, 0.01]]])
    test = routed(gen(A), [[[[0, 2], [2, 3]], [[0, 2], [1, 3]]]], [[[0.01, 0.01], [0.01, 0.01]]])
    assert compare_generation(baseline, test, tolerance=EXACT).reason.endswith("a decisive routing divergence")


def test_under_the_exact_tolerance_identical_records_match():
    assert compare_generation(gen(A, B), gen(A, B), tolerance=EXACT).status == "match"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_graph_against_eager_on_the_cpu_is_judged_exactly_where_it_measures_exact(dtype):
    assert Tolerance.for_pair(dtype, "cpu", across_kernels=False) == EXACT


def test_graph_against_eager_on_the_cpu_in_float32_is_judged_at_twice_its_measured_difference():
    assert Tolerance.for_pair(torch.float32, "cpu", across_kernels=False) == Tolerance(1e-4, 1e-4, 1e-4)


def test_graph_against_eager_where_unmeasured_keeps_the_tolerances_measured_before():
    # Not parametrized by device: a test id naming a device is skipped away from it (conftest.py).
    same = {(dtype, device): Tolerance.for_pair(dtype, device, across_kernels=False)
            for dtype in (torch.float32, torch.float16, torch.bfloat16) for device in ("cuda", "npu")}
    assert same == {(dtype, device): tolerance for device in ("cuda", "npu") for dtype, tolerance in {
        torch.float32: Tolerance(logprob_atol=1e-3, tie_margin=1e-2),
        torch.float16: Tolerance(logprob_atol=0.07, tie_margin=0.1),
        torch.bfloat16: Tolerance(logprob_atol=0.5, tie_margin=0.3),
    }.items()}


def test_across_kernels_the_tolerance_is_the_same_on_every_device_and_adds_a_router_gap():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        across = {Tolerance.for_pair(dtype, device, across_kernels=True) for device in ("cpu", "cuda", "npu")}
        assert len(across) == 1 and across.pop().router_gap > 0


def test_a_dtype_without_a_tolerance_is_refused():
    with pytest.raises(ValueError, match=r"no tolerance for torch\.int8"):
        Tolerance.for_pair(torch.int8, "cpu", across_kernels=True)


# --- MoE routing ---------------------------------------------------------------------------------------------

ROUTED = Tolerance(logprob_atol=0.01, tie_margin=0.1, router_gap=0.2)
PROMPT_EXPERTS = [[[0, 1], [2, 3]], [[0, 2], [1, 3]]]  # two prompt tokens, two MoE layers, top-2
WIDE_GAPS = [[0.9, 0.8], [0.7, 0.6]]


def routed(generation: Generation, experts: list, gaps: list) -> Generation:
    """`generation` with routing records: step 0 feeds the two prompt tokens, every later step one."""
    return dataclasses.replace(generation, routed_experts=experts, router_gaps=gaps)


def routing_of(token_experts: list, token_gaps: list, steps: int) -> tuple[list, list]:
    """The records of `steps` steps whose fed tokens after the prompt all route as `token_experts`."""
    return [PROMPT_EXPERTS] + [[token_experts]] * (steps - 1), [WIDE_GAPS] + [[token_gaps]] * (steps - 1)


def test_identical_routing_matches():
    baseline = routed(gen(A, B, A), *routing_of([[0, 1], [2, 3]], [0.5, 0.5], 3))
    test = routed(gen(A, B, A), *routing_of([[1, 0], [3, 2]], [0.5, 0.5], 3))  # the same sets, in another order
    assert compare_generation(baseline, test, tolerance=ROUTED).status == "match"


def test_a_routing_difference_on_a_router_near_tie_stops_a_free_run_before_the_step_it_feeds():
    baseline = routed(gen(A, B, A), *routing_of([[0, 1], [2, 3]], [0.1, 0.5], 3))
    test = routed(gen(A, B, A), *routing_of([[0, 2], [2, 3]], [0.15, 0.5], 3))
    verdict = compare_generation(baseline, test, tolerance=ROUTED)
    assert (verdict.status, verdict.compared, verdict.force_from, verdict.router_ties) == ("tie", 1, 1, 1)
    assert verdict.reason == ("step 1: baseline routed token 2 in MoE layer 0 to experts [0, 1], test to [0, 2] on a "
                              "router near-tie (gap 0.15 < 0.2); comparison stops here (1 of 3 steps compared)")


def test_a_router_near_tie_is_counted_and_passed_in_a_continuation_that_replays_the_baseline_experts():
    baseline = routed(gen(A, B, A), *routing_of([[0, 1], [2, 3]], [0.1, 0.5], 3))
    test = routed(gen(A, B, A), *routing_of([[0, 2], [2, 3]], [0.15, 0.5], 3))
    continuation = forced(test, [7, 5], from_step=1)
    verdict = compare_generation(baseline, test, tolerance=ROUTED, segments=in_loop(baseline, continuation, 1))
    assert (verdict.status, verdict.compared, verdict.router_ties, verdict.ties) == ("tie", 3, 3, 0)


@pytest.mark.parametrize(("baseline_gap", "test_gap"), [(0.5, 0.1), (0.1, 0.5)])
def test_a_routing_difference_where_either_side_is_far_from_a_tie_is_a_mismatch(baseline_gap, test_gap):
    baseline = routed(gen(A, B), *routing_of([[0, 1], [2, 3]], [0.5, baseline_gap], 2))
    test = routed(gen(A, B), *routing_of([[0, 1], [2, 1]], [0.5, test_gap], 2))
    verdict = compare_generation(baseline, test, tolerance=ROUTED, segments=in_loop(baseline, forced(test, [7], from_step=1), 1))
    assert (verdict.status, verdict.step) == ("mismatch", 1)
    assert verdict.reason == ("step 1: baseline routed token 2 in MoE layer 1 to experts [2, 3], test to [1, 2]; the "
                              "router gap 0.5 is at least 0.2: a decisive routing divergence")


def test_prompt_tokens_are_routed_at_step_0():
    baseline = routed(gen(A), [PROMPT_EXPERTS], [WIDE_GAPS])
    test = routed(gen(A), [[[[0, 1], [2, 3]], [[0, 2], [1, 2]]]], [WIDE_GAPS])
    verdict = compare_generation(baseline, test, tolerance=ROUTED)
    assert verdict.reason.startswith("step 0: baseline routed token 1 in MoE layer 1 to experts [1, 3], test to [1, 2]")


def test_routing_records_of_another_length_than_the_tokens_are_a_mismatch():
    test = routed(gen(A, B), [PROMPT_EXPERTS], [WIDE_GAPS])
    verdict = compare_generation(gen(A, B), test, tolerance=ROUTED)
    assert (verdict.status, verdict.reason) == ("mismatch", "test recorded routing for 1 steps but 2 tokens")


# --- MoE routing a test does not report: stop at the first router near-tie found by transformers -------------

# A decisive divergence at step 2: token 9 where the baseline chose 7 by a margin of 4.
DECISIVE_REF = gen(A, A, [(7, -0.1), (8, -4.1)])
DECISIVE_TEST = gen(A, A, [(9, -0.2), (7, -3.0)])


def test_first_routing_tie_is_the_first_position_below_the_router_gap():
    # Prompt of 3 tokens: position 4 is output token 1, whose hidden state step 2 reads first.
    assert first_routing_tie([0.9, 0.5, 0.3, 0.25, 0.15, 0.01], prompt_len=3, router_gap=0.2) == RoutingTie(4, 0.15, 2)
    assert first_routing_tie([0.9, 0.05], prompt_len=3, router_gap=0.2) == RoutingTie(1, 0.05, 0)
    assert first_routing_tie([0.9, 0.5], prompt_len=1, router_gap=0.2) is None


def test_a_divergence_after_a_routing_tie_ends_the_comparison_naming_the_token_and_gap():
    verdict = compare_generation(DECISIVE_REF, DECISIVE_TEST, tolerance=ROUTED, routing_tie=RoutingTie(4, 0.15, 2))
    assert (verdict.status, verdict.step, verdict.compared, verdict.force_from) == ("tie", 2, 2, None)
    assert verdict.reason.endswith(
        "a decisive divergence; but token 4 had a router gap of 0.15 < 0.2, so the kernels may route differently "
        "from step 2 on and the test does not report its routing: a routing near-tie; comparison stops here "
        "(2 of 3 steps compared)")


def test_a_divergence_before_the_routing_tie_is_still_a_mismatch():
    verdict = compare_generation(DECISIVE_REF, DECISIVE_TEST, tolerance=ROUTED, routing_tie=RoutingTie(5, 0.15, 3))
    assert (verdict.status, verdict.step) == ("mismatch", 2)


def test_a_routing_tie_never_excuses_an_inconsistent_record():
    test = gen(A, A, [(7, -0.1), (8, -4.1)])
    test.output_ids[2] = 8  # the recorded token is not its own top-1
    verdict = compare_generation(DECISIVE_REF, test, tolerance=ROUTED, routing_tie=RoutingTie(0, 0.01, 0))
    assert verdict.status == "mismatch"
    assert "the record is inconsistent" in verdict.reason


def test_a_routing_tie_never_excuses_a_wrong_token_count():
    short = gen(*DECISIVE_TEST.top_logprobs[:2])
    verdict = compare_generation(DECISIVE_REF, short, tolerance=ROUTED, routing_tie=RoutingTie(0, 0.01, 0))
    assert (verdict.status, verdict.reason) == ("mismatch", "test produced 2 tokens, baseline 3")


def test_routing_ties_are_applied_by_rid():
    baseline = [dataclasses.replace(DECISIVE_REF, rid="a"), dataclasses.replace(DECISIVE_REF, rid="b")]
    test = [dataclasses.replace(DECISIVE_TEST, rid="a"), dataclasses.replace(DECISIVE_TEST, rid="b")]
    verdicts = compare_generations(baseline, test, ROUTED, routing_ties={"b": RoutingTie(0, 0.01, 0)})
    assert [(v.rid, v.status) for v in verdicts] == [("a", "mismatch"), ("b", "tie")]
