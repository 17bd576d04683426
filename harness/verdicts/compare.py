"""Token-by-token comparison of two engines' generations, request by request: the run under test
against its baseline (transformers, or the same engine in eager mode).

Verdicts: `match` (same tokens, logprobs within the dtype tolerance), `tie` (first differing token
at a step where the baseline's top-2 margin is below the tie margin and each side's token is in
the other's top-k: float noise, not a bug; comparison of that request stops there, as in vLLM's
`check_logprobs_close`) and `mismatch` (a bug). A mismatch names the step, both tokens, their
logprobs and the baseline's margin, so a report can say exactly where and how decisively the
engines parted.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Literal

from harness.verdicts.routing import RoutingTie
from harness.verdicts.tolerances import Tolerance
from reference_runner.records import Generation

Status = Literal["match", "tie", "mismatch"]
STATUSES: tuple[Status, ...] = ("match", "tie", "mismatch")


@dataclass
class Verdict:
    """The judgement of one request; the token fields describe the first divergence, if any."""

    rid: str
    status: Status
    reason: str
    step: int | None = None
    baseline_token: int | None = None
    test_token: int | None = None
    baseline_logprob: float | None = None
    test_logprob: float | None = None
    margin: float | None = None  # baseline top-1 minus top-2 logprob at `step`
    max_logprob_diff: float = 0.0  # over tokens both sides rank in top-k, on the matched prefix

    @property
    def passed(self) -> bool:
        return self.status != "mismatch"


def compare_generation(baseline: Generation, test: Generation, *, tolerance: Tolerance,
                       routing_tie: RoutingTie | None = None) -> Verdict:
    """Judge one request: walk both generations step by step until they part or end."""
    for side, generation in (("baseline", baseline), ("test", test)):
        if generation.error is not None:
            return Verdict(baseline.rid, "mismatch", f"{side} rejected the request: {generation.error}")
        if len(generation.top_logprobs) != len(generation.output_ids):
            return Verdict(baseline.rid, "mismatch", f"{side} recorded {len(generation.output_ids)} tokens "
                           f"but {len(generation.top_logprobs)} top-k lists")
    verdict = _walk(baseline, test, tolerance, routing_tie)
    if verdict.passed and len(baseline.output_ids) != len(test.output_ids):
        # A near-tie excuses a token, never a wrong token count.
        return Verdict(baseline.rid, "mismatch", max_logprob_diff=verdict.max_logprob_diff,
                       reason=f"test produced {len(test.output_ids)} tokens, baseline {len(baseline.output_ids)}")
    return verdict


def compare_generations(baseline: list[Generation], test: list[Generation], tolerance: Tolerance,
                        routing_ties: dict[str, RoutingTie] | None = None) -> list[Verdict]:
    """Judge every request of either side, paired by rid; a request missing on one side is a mismatch.
    `routing_ties`: per rid, where a MoE router near-tie lets the two sides route differently."""
    baseline_by_rid, test_by_rid = _group_by_rid(baseline), _group_by_rid(test)
    verdicts = []
    for rid in dict.fromkeys([g.rid for g in baseline] + [g.rid for g in test]):
        baselines, tests = baseline_by_rid[rid], test_by_rid[rid]
        if len(baselines) == 1 and len(tests) == 1:
            verdicts.append(compare_generation(baselines[0], tests[0], tolerance=tolerance,
                                               routing_tie=(routing_ties or {}).get(rid)))
            continue
        found = [f"{len(gens) or 'no'} {side} generations"
                 for side, gens in (("baseline", baselines), ("test", tests)) if len(gens) != 1]
        verdicts.append(Verdict(rid, "mismatch", f"expected one generation per side, found {' and '.join(found)}"))
    return verdicts


def summarize(verdicts: list[Verdict]) -> dict[str, int]:
    """Number of verdicts of each status."""
    counts = Counter(v.status for v in verdicts)
    return {status: counts[status] for status in STATUSES}


def _walk(baseline: Generation, test: Generation, tolerance: Tolerance, routing_tie: RoutingTie | None) -> Verdict:
    """The verdict of the steps both generations have, up to the first divergence."""

    def diverged(step: int, status: Status, reason: str) -> Verdict:
        if status == "mismatch" and routing_tie is not None and routing_tie.step <= step:
            status, reason = "tie", (
                f"{reason}; but token {routing_tie.position} had a router gap of {routing_tie.gap:.3g} < "
                f"{tolerance.router_gap:g}, so the kernels may route differently from step {routing_tie.step} on: "
                "a routing near-tie, comparison stops here")
        return _verdict_at(step, baseline, test, status, reason, max_diff)

    max_diff = 0.0
    for step, (baseline_token, test_token) in enumerate(zip(baseline.output_ids, test.output_ids)):
        baseline_top, test_top = baseline.top_logprobs[step], test.top_logprobs[step]
        inconsistency = _inconsistency("baseline", baseline_token, baseline_top) or _inconsistency("test", test_token, test_top)
        if inconsistency:
            return _verdict_at(step, baseline, test, "mismatch", inconsistency, max_diff)
        baseline_lp, test_lp = dict(baseline_top), dict(test_top)
        if baseline_token == test_token:
            max_diff = max(max_diff, *(abs(baseline_lp[t] - test_lp[t]) for t in baseline_lp.keys() & test_lp.keys()))
            if max_diff > tolerance.logprob_atol:
                drifted = f"same token {baseline_token}, but logprobs drifted by {max_diff:.3g} > {tolerance.logprob_atol:g}"
                return diverged(step, "mismatch", drifted)
            continue
        margin = _margin(baseline_top)
        parted = (f"baseline chose {baseline_token} ({_fmt(baseline_lp.get(baseline_token))}), test chose {test_token} "
                  f"({_fmt(test_lp.get(test_token))}); the baseline top-2 margin {margin:.3g} is")
        unranked = [f"{side} token {token} is not in the {other}'s top-k"
                    for side, token, other, other_lp in (("baseline", baseline_token, "test", test_lp),
                                                         ("test", test_token, "baseline", baseline_lp))
                    if token not in other_lp]
        if margin >= tolerance.tie_margin:
            status, why = "mismatch", f"at least the tie margin {tolerance.tie_margin:g}: a decisive divergence"
        elif unranked:
            status, why = "mismatch", f"below the tie margin {tolerance.tie_margin:g}, but {' and '.join(unranked)}"
        else:
            status, why = "tie", (f"below the tie margin {tolerance.tie_margin:g} and each token is in the other's "
                                  "top-k: a near-tie, comparison stops here")
        return diverged(step, status, f"{parted} {why}")
    return Verdict(baseline.rid, "match", f"all {len(baseline.output_ids)} tokens match; largest logprob difference "
                   f"{max_diff:.3g}", max_logprob_diff=max_diff)


def _verdict_at(step: int, baseline: Generation, test: Generation, status: Status, reason: str, max_diff: float) -> Verdict:
    baseline_token, test_token = baseline.output_ids[step], test.output_ids[step]
    return Verdict(
        baseline.rid, status, f"step {step}: {reason}", step=step, baseline_token=baseline_token, test_token=test_token,
        baseline_logprob=dict(baseline.top_logprobs[step]).get(baseline_token),
        test_logprob=dict(test.top_logprobs[step]).get(test_token),
        margin=_margin(baseline.top_logprobs[step]), max_logprob_diff=max_diff,
    )


def _margin(top: list[tuple[int, float]]) -> float:
    return top[0][1] - top[1][1] if len(top) >= 2 else float("inf")


def _inconsistency(side: str, token: int, top: list[tuple[int, float]]) -> str | None:
    """Why `token` cannot be the greedy choice recorded with `top`, or None if it can."""
    if not top:
        return f"{side} recorded no top-k logprobs"
    # An exact tie for first place may be listed in either order.
    if dict(top).get(token) != top[0][1]:
        return (f"{side} token {token} is not its own top-1 ({top[0][0]} at {top[0][1]:.4f}); the record is "
                "inconsistent, e.g. outputs read after their buffer was overwritten")
    return None


def _fmt(logprob: float | None) -> str:
    return "not in top-k" if logprob is None else f"{logprob:.4f}"


def _group_by_rid(generations: list[Generation]) -> defaultdict[str, list[Generation]]:
    grouped: defaultdict[str, list[Generation]] = defaultdict(list)
    for generation in generations:
        grouped[generation.rid].append(generation)
    return grouped
