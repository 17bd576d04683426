"""Token-by-token comparison of two engines' generations, request by request.

Verdicts: `match` (same tokens, logprobs within the dtype tolerance), `tie` (first differing token
at a step where the reference's top-2 margin is below the tie margin and each side's token is in
the other's top-k: float noise, not a bug; comparison of that request stops there, as in vLLM's
`check_logprobs_close`) and `mismatch` (a bug). A mismatch names the step, both tokens, their
logprobs and the reference's margin, so a report can say exactly where and how decisively the
engines parted.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Literal

import torch

from reference_runner.records import Generation

Status = Literal["match", "tie", "mismatch"]
STATUSES: tuple[Status, ...] = ("match", "tie", "mismatch")


@dataclass(frozen=True)
class Tolerance:
    """How far two correct engines may drift apart in one dtype.

    `logprob_atol` bounds the logprob difference of a token both sides rank in their top-k while
    the chosen tokens agree; `tie_margin` is the reference top-2 margin below which a differing
    token is accepted as a near-tie; `router_gap` is the MoE router logit gap below which the two
    sides may pick different experts (see `RoutingTie`).
    """

    logprob_atol: float
    tie_margin: float
    router_gap: float = 0.0

    @classmethod
    def for_dtype(cls, dtype: torch.dtype, across_kernels: bool = False) -> Tolerance:
        """The tolerance for generations computed in `dtype`, by the same kernels (graph replay against
        eager) or by different ones (eager against transformers, compiled against eager)."""
        table = _ACROSS_KERNELS if across_kernels else _SAME_KERNELS
        if dtype not in table:
            raise ValueError(f"no tolerance for {dtype}; known: {', '.join(map(str, table))}")
        return table[dtype]


# Measured on the builtin tiny checkpoints, 4 models x workloads mixed, join_leave and batch8 x 2 seeds
# (104 requests per dtype and pair), and the fault suite in each dtype:
# - Same kernels (graph replay against eager): logprobs identical in float32, float16 and bfloat16
#   alike. The tolerances below are those of two different kernels measured before (transformers with
#   and without its KV cache), left as they are: every fault is caught in every dtype by a decisive
#   divergence (top-2 margin >= 2.2) or a token outside the other's top-k, never by the tolerance.
# - Different kernels (eager against transformers, inductor-compiled against eager), dense models:
#   float32 logprobs differ by at most 1e-4; float16 by up to 0.13, and tokens flip at margins up to
#   0.055; bfloat16 by up to 0.65 (8 significant bits round logits of size 16-32 to a grid of 0.125),
#   flipping at margins up to 0.5. The values below leave about 1.5x headroom.
# - Different kernels, MoE: a router near-tie sends a token to another expert and moves every later
#   logprob by up to 4.3, or flips a token at a margin up to 2.1. Each such divergence came after a
#   router gap (float32, `harness/routing.py`) below 0.005 in float16 and 0.151 in bfloat16, and 0.028 in
#   float16 on held-out seeds: `router_gap` is 0.05, and 0.4 for bfloat16's 8x coarser rounding. Nearly
#   every prompt of the tiny MoE checkpoints holds a gap that small, so across kernels in float16 or
#   bfloat16 they are judged mostly up to their first divergence; graph replay against eager (same
#   kernels) is what keeps MoE verdicts strict there.
_SAME_KERNELS: dict[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(logprob_atol=1e-3, tie_margin=1e-2),
    torch.float16: Tolerance(logprob_atol=0.07, tie_margin=0.1),
    torch.bfloat16: Tolerance(logprob_atol=0.5, tie_margin=0.3),
}
_ACROSS_KERNELS: dict[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(logprob_atol=1e-3, tie_margin=1e-2, router_gap=1e-3),
    torch.float16: Tolerance(logprob_atol=0.2, tie_margin=0.1, router_gap=0.05),
    torch.bfloat16: Tolerance(logprob_atol=1.0, tie_margin=0.75, router_gap=0.4),
}


@dataclass(frozen=True)
class RoutingTie:
    """The first token position of a request whose MoE routing two kernels may settle differently.

    Every step from `step` on reads that token's hidden state (through the KV cache), so a divergence
    from there is float noise amplified by a discrete choice, and comparison stops at it as at a near-tie.
    """

    position: int  # in prompt + output
    gap: float  # the router logit gap between the k-th and the (k+1)-th expert there
    step: int  # the first decode step whose logits depend on that position


def first_routing_tie(gaps: list[float], prompt_len: int, router_gap: float) -> RoutingTie | None:
    """The earliest position whose router gap is below `router_gap`, or None."""
    for position, gap in enumerate(gaps):
        if gap < router_gap:
            return RoutingTie(position, gap, max(0, position - prompt_len + 1))
    return None


@dataclass
class Verdict:
    """The judgement of one request; the token fields describe the first divergence, if any."""

    rid: str
    status: Status
    reason: str
    step: int | None = None
    ref_token: int | None = None
    test_token: int | None = None
    ref_logprob: float | None = None
    test_logprob: float | None = None
    margin: float | None = None  # reference top-1 minus top-2 logprob at `step`
    max_logprob_diff: float = 0.0  # over tokens both sides rank in top-k, on the matched prefix

    @property
    def passed(self) -> bool:
        return self.status != "mismatch"


def compare_generation(ref: Generation, test: Generation, *, tolerance: Tolerance,
                       routing_tie: RoutingTie | None = None) -> Verdict:
    """Judge one request: walk both generations step by step until they part or end."""
    for side, generation in (("reference", ref), ("test", test)):
        if generation.error is not None:
            return Verdict(ref.rid, "mismatch", f"{side} rejected the request: {generation.error}")
        if len(generation.top_logprobs) != len(generation.output_ids):
            return Verdict(ref.rid, "mismatch", f"{side} recorded {len(generation.output_ids)} tokens "
                           f"but {len(generation.top_logprobs)} top-k lists")
    verdict = _walk(ref, test, tolerance, routing_tie)
    if verdict.passed and len(ref.output_ids) != len(test.output_ids):
        # A near-tie excuses a token, never a wrong token count.
        return Verdict(ref.rid, "mismatch", max_logprob_diff=verdict.max_logprob_diff,
                       reason=f"test produced {len(test.output_ids)} tokens, reference {len(ref.output_ids)}")
    return verdict


def compare_generations(ref: list[Generation], test: list[Generation], tolerance: Tolerance,
                        routing_ties: dict[str, RoutingTie] | None = None) -> list[Verdict]:
    """Judge every request of either side, paired by rid; a request missing on one side is a mismatch.
    `routing_ties`: per rid, where a MoE router near-tie lets the two sides route differently."""
    ref_by_rid, test_by_rid = _group_by_rid(ref), _group_by_rid(test)
    verdicts = []
    for rid in dict.fromkeys([g.rid for g in ref] + [g.rid for g in test]):
        refs, tests = ref_by_rid[rid], test_by_rid[rid]
        if len(refs) == 1 and len(tests) == 1:
            verdicts.append(compare_generation(refs[0], tests[0], tolerance=tolerance,
                                               routing_tie=(routing_ties or {}).get(rid)))
            continue
        found = [f"{len(gens) or 'no'} {side} generations"
                 for side, gens in (("reference", refs), ("test", tests)) if len(gens) != 1]
        verdicts.append(Verdict(rid, "mismatch", f"expected one generation per side, found {' and '.join(found)}"))
    return verdicts


def summarize(verdicts: list[Verdict]) -> dict[str, int]:
    """Number of verdicts of each status."""
    counts = Counter(v.status for v in verdicts)
    return {status: counts[status] for status in STATUSES}


def _walk(ref: Generation, test: Generation, tolerance: Tolerance, routing_tie: RoutingTie | None) -> Verdict:
    """The verdict of the steps both generations have, up to the first divergence."""

    def diverged(step: int, status: Status, reason: str) -> Verdict:
        if status == "mismatch" and routing_tie is not None and routing_tie.step <= step:
            status, reason = "tie", (
                f"{reason}; but token {routing_tie.position} had a router gap of {routing_tie.gap:.3g} < "
                f"{tolerance.router_gap:g}, so the kernels may route differently from step {routing_tie.step} on: "
                "a routing near-tie, comparison stops here")
        return _verdict_at(step, ref, test, status, reason, max_diff)

    max_diff = 0.0
    for step, (ref_token, test_token) in enumerate(zip(ref.output_ids, test.output_ids)):
        ref_top, test_top = ref.top_logprobs[step], test.top_logprobs[step]
        inconsistency = _inconsistency("reference", ref_token, ref_top) or _inconsistency("test", test_token, test_top)
        if inconsistency:
            return _verdict_at(step, ref, test, "mismatch", inconsistency, max_diff)
        ref_lp, test_lp = dict(ref_top), dict(test_top)
        if ref_token == test_token:
            max_diff = max(max_diff, *(abs(ref_lp[t] - test_lp[t]) for t in ref_lp.keys() & test_lp.keys()))
            if max_diff > tolerance.logprob_atol:
                drifted = f"same token {ref_token}, but logprobs drifted by {max_diff:.3g} > {tolerance.logprob_atol:g}"
                return diverged(step, "mismatch", drifted)
            continue
        margin = _margin(ref_top)
        parted = (f"reference chose {ref_token} ({_fmt(ref_lp.get(ref_token))}), test chose {test_token} "
                  f"({_fmt(test_lp.get(test_token))}); the reference top-2 margin {margin:.3g} is")
        unranked = [f"{side} token {token} is not in the {other}'s top-k"
                    for side, token, other, other_lp in (("reference", ref_token, "test", test_lp),
                                                         ("test", test_token, "reference", ref_lp))
                    if token not in other_lp]
        if margin >= tolerance.tie_margin:
            status, why = "mismatch", f"at least the tie margin {tolerance.tie_margin:g}: a decisive divergence"
        elif unranked:
            status, why = "mismatch", f"below the tie margin {tolerance.tie_margin:g}, but {' and '.join(unranked)}"
        else:
            status, why = "tie", (f"below the tie margin {tolerance.tie_margin:g} and each token is in the other's "
                                  "top-k: a near-tie, comparison stops here")
        return diverged(step, status, f"{parted} {why}")
    return Verdict(ref.rid, "match", f"all {len(ref.output_ids)} tokens match; largest logprob difference "
                   f"{max_diff:.3g}", max_logprob_diff=max_diff)


def _verdict_at(step: int, ref: Generation, test: Generation, status: Status, reason: str, max_diff: float) -> Verdict:
    ref_token, test_token = ref.output_ids[step], test.output_ids[step]
    return Verdict(
        ref.rid, status, f"step {step}: {reason}", step=step, ref_token=ref_token, test_token=test_token,
        ref_logprob=dict(ref.top_logprobs[step]).get(ref_token),
        test_logprob=dict(test.top_logprobs[step]).get(test_token),
        margin=_margin(ref.top_logprobs[step]), max_logprob_diff=max_diff,
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
