"""Comparing past near-ties. After a near-tie the two sides feed different tokens (or hold other experts' output in
their KV caches), so the judge has the steps from there recomputed with the two sides' inputs equal again, as
`Segment`s that the comparison walks on into (`verdicts/compare.py`). How, is the target's (`Target.forcing`):

- In the loop (`in_loop`: the reference runner, vLLM): the test runs once more, every request of the scenario in one
  run (the same schedule), those that stopped fed the baseline's tokens from their near-tie on and, where the test
  reports its routing, computing with the baseline's experts. The engine still records its own top-k logprobs at every
  step; one re-run reaches every request's last step.
- By continuation (`continuation`: SGLang, whose logprobs are taken after its logit processors, and any target that
  takes token ids; and, for every target, past a MoE router near-tie of a test that does not report its routing): each
  stopped request is submitted again to both sides, with the baseline's tokens before the stop appended to its prompt,
  and what the two decode from there is compared; repeated, in rounds, past later near-ties to the last step. Both
  sides are continued alike, so that a same-kernel pair stays same-kernel (the first continued step comes from a
  prefill on both sides); against transformers, the oracle scores the test's continuation.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from harness.verdicts.compare import Segment, Verdict, splice
from reference_runner.records import Generation, Request

RunRequests = Callable[[list[Request]], list[Generation]]


@dataclass
class Sides:
    """A scenario's two sides as forcing needs them: the requests, and how to run each side again."""

    requests: list[Request]
    force_test: RunRequests  # every request, some forced in the loop: the scenario's own schedule
    continue_test: RunRequests
    # The baseline's continuations of the given requests, given the test's (the oracle scores those).
    continue_baseline: Callable[[list[Request], list[Generation]], list[Generation]]


def next_segments(forcing: str, stops: Sequence[Verdict], baseline: dict[str, Generation], test: dict[str, Generation],
                  segments: dict[str, list[Segment]], sides: Sides) -> list[Segment]:
    """The segments that carry on the comparisons stopped at `stops`, where each stands (its baseline and test as the
    walk reached the stop); none for a stop already continued from (no progress) or at the last step."""
    due = [v for v in stops if v.resume_from is not None and v.resume_from < v.generated
           and all(s.start != v.resume_from for s in segments.get(v.rid, ()))]
    in_loop = [v for v in due if forcing == "in_loop" and v.force_from is not None
               and all(s.method != "in_loop" for s in segments.get(v.rid, ()))]
    continued = [v for v in due if v not in in_loop]
    return [*forced_in_loop(in_loop, baseline, sides), *continuations(continued, baseline, test, sides)]


def forced_in_loop(stops: Sequence[Verdict], baseline: dict[str, Generation], sides: Sides) -> list[Segment]:
    """One re-run of every request, those stopped forced from their stop to feed the baseline's tokens and experts."""
    if not stops:
        return []
    stopped = {v.rid: v for v in stops}
    rerun = {g.rid: g for g in sides.force_test([
        forced_request(r, baseline[r.rid], stopped[r.rid].force_from) if r.rid in stopped else r for r in sides.requests])}
    return [Segment(v.resume_from, baseline[v.rid], rerun[v.rid], "in_loop") for v in stops]


def continuations(stops: Sequence[Verdict], baseline: dict[str, Generation], test: dict[str, Generation],
                  sides: Sides) -> list[Segment]:
    """Each stopped request submitted again to both sides, continued from the baseline's tokens before its stop."""
    if not stops:
        return []
    by_rid = {r.rid: r for r in sides.requests}
    requests = [continued_request(by_rid[v.rid], baseline[v.rid], v.resume_from) for v in stops]
    tests = {g.rid: g for g in sides.continue_test(requests)}
    baselines = {g.rid: g for g in sides.continue_baseline(requests, [tests[r.rid] for r in requests])}
    return [Segment(v.resume_from, splice(baseline[v.rid], v.resume_from, baselines[v.rid]),
                    splice(test[v.rid], v.resume_from, tests[v.rid]), "continuation") for v in stops]


def forced_request(request: Request, baseline: Generation, step: int) -> Request:
    """`request` fed the baseline's tokens from `step` on and computing with the baseline's experts (MoE)."""
    return replace(request, forced_from=step, forced_ids=baseline.output_ids[step:],
                   forced_experts=[position for fed in baseline.routed_experts for position in fed])


def continued_request(request: Request, baseline: Generation, start: int) -> Request:
    """`request` with the baseline's tokens before step `start` appended to its prompt: it decodes steps `start`.. of
    the original, all at once (arrivals are the original run's)."""
    return Request(request.rid, request.prompt_ids + baseline.output_ids[:start], request.max_new_tokens - start)
