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
    token is accepted as a near-tie.
    """

    logprob_atol: float
    tie_margin: float

    @classmethod
    def for_dtype(cls, dtype: torch.dtype) -> Tolerance:
        """The tolerance for generations computed in `dtype`."""
        if dtype not in _TOLERANCES:
            raise ValueError(f"no tolerance for {dtype}; known: {', '.join(map(str, _TOLERANCES))}")
        return _TOLERANCES[dtype]


# Measured on the builtin tiny checkpoints: transformers greedy decoding with a KV cache against greedy
# decoding by full recompute (same maths, different kernel shapes), 24 requests x 64 tokens per model.
# float32: logprobs differ by at most 1e-4 and no token ever flips; atol and tie margin leave 10x and
#   100x headroom and every request matches.
# float16: differences up to 0.048, flips only at margins <= 0.031; atol 0.07 is about vLLM-Ascend's
#   0.0689 for the same eager-vs-graph purpose (tests/e2e/singlecard/utils.py, compare_logprobs).
# bfloat16: 8 significant bits round logits of size 16-32 to a grid of 0.125 (0.25 above 32), so
#   logprobs of dense models differ by up to 0.19 and tokens flip at margins up to 0.125: 0.07 judged 22 of 24
#   correct requests a mismatch. The tie margin admits one grid step of logits up to 64, the atol
#   about four. MoE in bfloat16 stays beyond any per-token tolerance: a router near-tie sends a token
#   to another expert and moves its logprobs by up to 2.6 (1-2 requests in 24 mismatched), so compare
#   MoE in float32 or float16.
_TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(logprob_atol=1e-3, tie_margin=1e-2),
    torch.float16: Tolerance(logprob_atol=0.07, tie_margin=0.1),
    torch.bfloat16: Tolerance(logprob_atol=0.5, tie_margin=0.3),
}


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


def compare_generation(ref: Generation, test: Generation, *, tolerance: Tolerance) -> Verdict:
    """Judge one request: walk both generations step by step until they part or end."""
    for side, generation in (("reference", ref), ("test", test)):
        if generation.error is not None:
            return Verdict(ref.rid, "mismatch", f"{side} rejected the request: {generation.error}")
        if len(generation.top_logprobs) != len(generation.output_ids):
            return Verdict(ref.rid, "mismatch", f"{side} recorded {len(generation.output_ids)} tokens "
                           f"but {len(generation.top_logprobs)} top-k lists")
    verdict = _walk(ref, test, tolerance)
    if verdict.passed and len(ref.output_ids) != len(test.output_ids):
        # A near-tie excuses a token, never a wrong token count.
        return Verdict(ref.rid, "mismatch", max_logprob_diff=verdict.max_logprob_diff,
                       reason=f"test produced {len(test.output_ids)} tokens, reference {len(ref.output_ids)}")
    return verdict


def compare_generations(ref: list[Generation], test: list[Generation], tolerance: Tolerance) -> list[Verdict]:
    """Judge every request of either side, paired by rid; a request missing on one side is a mismatch."""
    ref_by_rid, test_by_rid = _group_by_rid(ref), _group_by_rid(test)
    verdicts = []
    for rid in dict.fromkeys([g.rid for g in ref] + [g.rid for g in test]):
        refs, tests = ref_by_rid[rid], test_by_rid[rid]
        if len(refs) == 1 and len(tests) == 1:
            verdicts.append(compare_generation(refs[0], tests[0], tolerance=tolerance))
            continue
        found = [f"{len(gens) or 'no'} {side} generations"
                 for side, gens in (("reference", refs), ("test", tests)) if len(gens) != 1]
        verdicts.append(Verdict(rid, "mismatch", f"expected one generation per side, found {' and '.join(found)}"))
    return verdicts


def summarize(verdicts: list[Verdict]) -> dict[str, int]:
    """Number of verdicts of each status."""
    counts = Counter(v.status for v in verdicts)
    return {status: counts[status] for status in STATUSES}


def _walk(ref: Generation, test: Generation, tolerance: Tolerance) -> Verdict:
    """The verdict of the steps both generations have, up to the first divergence."""
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
                return _verdict_at(step, ref, test, "mismatch", drifted, max_diff)
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
        return _verdict_at(step, ref, test, status, f"{parted} {why}", max_diff)
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
