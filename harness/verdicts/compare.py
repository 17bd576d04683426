"""Token-by-token comparison of two engines' generations, request by request: the run under test
against its baseline (transformers, or the same engine in eager mode).

A step is compared where both sides computed it from the same inputs: then the two choices (each side's
top-1) must agree, and the logprobs of every token both sides rank in their top-k must agree within the
dtype's tolerance. Choices that differ on a near-tie (the baseline's top-2 margin below the tie margin,
each side's token in the other's top-k) are float noise: counted, not a bug. MoE routing is compared the
same way, per fed token and MoE layer: the two sets of experts must agree unless the router logit gap
between the k-th and (k+1)-th expert is below `router_gap` on both sides (a router near-tie).

A near-tie after which the two sides feed different tokens, or hold other experts' output in their KV
caches, ends the comparison of the free-running test. A `Segment` recomputed from the baseline's inputs
carries it on (`harness/forcing.py` makes them): the test re-run with the baseline's tokens forced in its
loop from that step, and the baseline's expert choices replayed, reaches the last step, where near-ties
are counted and any decisive divergence is a `mismatch`; or both sides continued from the baseline's
tokens up to the stop compare on until the next near-tie, where the next segment takes over. Without one
the comparison stops there, as vLLM's `check_logprobs_close` does, and the verdict says how many steps it
compared.

Verdicts: `match` (every step compared, no near-tie), `tie` (no decisive divergence; near-ties counted,
or the comparison stopped at one) and `mismatch` (a bug: the reason names the step, both tokens, their
logprobs and the baseline's margin).
"""
from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from harness.verdicts.routing import RoutingTie
from harness.verdicts.tolerances import Tolerance
from reference_runner.records import Generation, Request

Status = Literal["match", "tie", "mismatch"]
STATUSES: tuple[Status, ...] = ("match", "tie", "mismatch")


@dataclass
class Verdict:
    """The judgement of one request; the token fields describe the mismatch, else the first near-tie."""

    rid: str
    status: Status
    reason: str
    step: int | None = None
    baseline_token: int | None = None
    test_token: int | None = None
    baseline_logprob: float | None = None
    test_logprob: float | None = None
    margin: float | None = None  # baseline top-1 minus top-2 logprob at `step`
    max_logprob_diff: float = 0.0  # over tokens both sides rank in top-k, on the steps compared
    compared: int = 0  # steps whose two distributions were compared
    generated: int = 0  # steps of the request
    ties: int = 0  # compared steps whose choices differ on a near-tie
    router_ties: int = 0  # (fed token, MoE layer) pairs routed to other experts on a router near-tie
    # Stopped where the two sides' inputs parted: a segment from step `resume_from` would continue it; one forced in
    # the test's loop must be forced from step `force_from` (None: no forcing restores the inputs, e.g. the routing of
    # a test that does not report it).
    resume_from: int | None = None
    force_from: int | None = None
    continued_by: list[str] = dataclasses.field(default_factory=list)  # the methods of the segments it went through

    @property
    def passed(self) -> bool:
        return self.status != "mismatch"


METHODS = ("in_loop", "continuation")  # how a segment was recomputed (`Target.forcing`)


@dataclass(frozen=True)
class Segment:
    """A request's steps from `start` on, recomputed with the two sides' inputs equal again; both generations are whole
    (their steps before `start` are those the comparison reached it with).

    `in_loop`: the test re-run forced from the step before a token near-tie's `start` (a router near-tie's `start`
    itself) to feed the baseline's tokens and experts to its last step, so near-ties no longer part the inputs; the
    baseline is unchanged. `continuation`: both sides continued from the prompt and the baseline's tokens before `start`,
    each choosing on its own again, so the next near-tie parts them again and another segment takes over there.
    """

    start: int
    baseline: Generation
    test: Generation
    method: str  # one of METHODS


@dataclass(frozen=True)
class _Stop:
    """The two sides' inputs part at step `resume`: the comparison can go on only in a segment from there, forced in
    the test's loop from step `force_from` (None: only a continuation can restore them)."""

    resume: int
    force_from: int | None
    reason: str


def compare_generation(baseline: Generation, test: Generation, *, tolerance: Tolerance, segments: Sequence[Segment] = (),
                       routing_tie: RoutingTie | None = None) -> Verdict:
    """Judge one request: walk both generations step by step, and past each stop into the segment that starts there,
    when there is one.

    `routing_tie`: for a test that does not report its routing, the first token whose router gap lets
    the two sides route differently; a divergence from its step on ends the comparison as a near-tie.
    """
    generated = len(baseline.output_ids)
    if problem := _record_problem(baseline, test):
        return Verdict(baseline.rid, "mismatch", problem, generated=generated)
    walk = _Walk(baseline, tolerance, routing_tie)
    end = walk.run(test, 0, continuing=False)
    starts = {segment.start: segment for segment in segments}
    while isinstance(end, _Stop) and (segment := starts.pop(end.resume, None)) is not None:
        if problem := _segment_problem(walk.baseline, test, segment, end):
            at = end.force_from if segment.method == "in_loop" and end.force_from is not None else end.resume
            what = (f"the re-run forced from step {end.force_from}" if segment.method == "in_loop"
                    else f"the continuation from step {end.resume}")
            return walk.verdict(walk.mismatch(at, test, f"{what} {problem}"))
        walk.baseline, test = segment.baseline, segment.test
        walk.methods.append(segment.method)
        end = walk.run(test, end.resume, continuing=segment.method == "in_loop")
    if isinstance(end, _Stop) and end.resume >= generated:  # stopped at the last step: nothing is left to compare
        end = None
    return walk.verdict(end)


def compare_generations(baseline: list[Generation], test: list[Generation], tolerance: Tolerance, *,
                        segments: dict[str, Sequence[Segment]] | None = None,
                        routing_ties: dict[str, RoutingTie] | None = None) -> list[Verdict]:
    """Judge every request of either side, paired by rid; a request missing on one side is a mismatch.
    `segments`: per rid, its steps recomputed past its stops; `routing_ties`: per rid, where a MoE router near-tie lets
    a test that does not report its routing route differently."""
    baseline_by_rid, test_by_rid = _group_by_rid(baseline), _group_by_rid(test)
    verdicts = []
    for rid in dict.fromkeys([g.rid for g in baseline] + [g.rid for g in test]):
        baselines, tests = baseline_by_rid[rid], test_by_rid[rid]
        if len(baselines) == 1 and len(tests) == 1:
            verdicts.append(compare_generation(baselines[0], tests[0], tolerance=tolerance,
                                               segments=(segments or {}).get(rid, ()),
                                               routing_tie=(routing_ties or {}).get(rid)))
            continue
        found = [f"{len(gens) or 'no'} {side} generations"
                 for side, gens in (("baseline", baselines), ("test", tests)) if len(gens) != 1]
        generated = max(len(g.output_ids) for g in baselines + tests)
        verdicts.append(Verdict(rid, "mismatch", f"expected one generation per side, found {' and '.join(found)}",
                                generated=generated))
    return verdicts


def splice(first: Generation, start: int, rest: Generation) -> Generation:
    """`first`'s steps before `start`, then `rest`'s (a continuation, whose step 0 is step `start`). Routing is left out:
    continuations serve tests that do not report it."""
    forced_from = first.forced_from if first.forced_from is not None and first.forced_from < start else (
        None if rest.forced_from is None else start + rest.forced_from)
    return Generation(first.rid, first.output_ids[:start] + rest.output_ids, first.top_logprobs[:start] + rest.top_logprobs,
                      first.graph_steps[:start] + rest.graph_steps, rest.error, forced_from)


def length_problems(requests: list[Request], generations: list[Generation]) -> dict[str, Verdict]:
    """A mismatch for every generation that is not rejected but has another token count than its request
    asked for (a baseline that scores the test's own tokens cannot see that)."""
    asked = {r.rid: r.max_new_tokens for r in requests}
    return {g.rid: Verdict(g.rid, "mismatch", f"test produced {len(g.output_ids)} tokens, the request asks for "
                           f"{asked[g.rid]}", generated=asked[g.rid])
            for g in generations if g.error is None and g.rid in asked and len(g.output_ids) != asked[g.rid]}


def summarize(verdicts: list[Verdict]) -> dict[str, int]:
    """Number of verdicts of each status."""
    counts = Counter(v.status for v in verdicts)
    return {status: counts[status] for status in STATUSES}


def coverage(verdicts: list[Verdict]) -> tuple[int, int]:
    """Steps compared and steps generated, over all verdicts."""
    return sum(v.compared for v in verdicts), sum(v.generated for v in verdicts)


class _Walk:
    """The comparison of one request so far: steps compared, near-ties counted, largest logprob difference."""

    def __init__(self, baseline: Generation, tolerance: Tolerance, routing_tie: RoutingTie | None) -> None:
        self.baseline = baseline
        self.tolerance = tolerance
        self.routing_tie = routing_tie
        self.compared = self.ties = self.router_ties = 0
        self.max_diff = self.step_diff = 0.0
        self.first_tie: Verdict | None = None
        self.last_tie: Verdict | None = None
        self.methods: list[str] = []  # of the segments walked through

    def run(self, test: Generation, start: int, continuing: bool) -> Verdict | _Stop | None:
        """Compare the steps of `test` from `start`: a mismatch, where the two sides' inputs part, or None
        once every step is compared. `continuing`: `test` replays the baseline's tokens and experts, so a
        near-tie never parts their inputs."""
        for step in range(start, len(self.baseline.output_ids)):
            if inconsistent := self._inconsistent(step, test):
                return inconsistent  # never excused
            self.step_diff = 0.0
            end = self._routing(step, test, continuing) or self._tokens(step, test)
            if isinstance(end, Verdict) and self.routing_tie is not None and self.routing_tie.step <= step:
                tie = self.routing_tie
                return _Stop(step, None, (
                    f"{end.reason}; but token {tie.position} had a router gap of {tie.gap:.3g} < "
                    f"{self.tolerance.router_gap:g}, so the kernels may route differently from step {tie.step} on "
                    "and the test does not report its routing: a routing near-tie"))
            self.max_diff = max(self.max_diff, self.step_diff)
            if end is not None:
                return end
            self.compared += 1
            baseline_token, test_token = self.baseline.output_ids[step], test.output_ids[step]
            if baseline_token != test_token:
                if self.last_tie is None or self.last_tie.step != step:
                    return self.mismatch(step, test, f"baseline fed token {baseline_token}, test {test_token}, but "
                                                     "neither chose it on a near-tie")
                return _Stop(step + 1, step, f"{self.last_tie.reason}, after which the two sides feed different tokens")
        return None

    def _inconsistent(self, step: int, test: Generation) -> Verdict | None:
        """A side whose own choice is not its own top-1: its record cannot be trusted."""
        for side, generation in (("baseline", self.baseline), ("test", test)):
            if generation.chose(step) and (why := _inconsistency(side, generation.output_ids[step],
                                                                  generation.top_logprobs[step])):
                return self.mismatch(step, test, why)
        return None

    def _routing(self, step: int, test: Generation, continuing: bool) -> Verdict | _Stop | None:
        """Compare the experts each MoE layer chose for the tokens this step's forward fed."""
        baseline, router_gap = self.baseline, self.tolerance.router_gap
        if not baseline.routed_experts or not test.routed_experts:
            return None
        prompt_len = len(baseline.routed_experts[0])
        fed = zip(baseline.routed_experts[step], test.routed_experts[step],
                  baseline.router_gaps[step], test.router_gaps[step])
        for i, (baseline_layers, test_layers, baseline_gaps, test_gaps) in enumerate(fed):
            position = i if step == 0 else prompt_len + step - 1
            for layer, (baseline_ids, test_ids) in enumerate(zip(baseline_layers, test_layers)):
                if set(baseline_ids) == set(test_ids):
                    continue
                gap = max(baseline_gaps[layer], test_gaps[layer])
                routed = (f"baseline routed token {position} in MoE layer {layer} to experts {sorted(baseline_ids)}, "
                          f"test to {sorted(test_ids)}")
                if gap >= router_gap:
                    return self.mismatch(step, test, f"{routed}; the router gap {gap:.3g} is at least {router_gap:g}: "
                                                     "a decisive routing divergence")
                self.router_ties += 1
                if not continuing:  # their KV caches now hold other experts' output
                    return _Stop(step, step, f"step {step}: {routed} on a router near-tie (gap {gap:.3g} < {router_gap:g})")
        return None

    def _tokens(self, step: int, test: Generation) -> Verdict | None:
        """Compare the two distributions of `step`; a mismatch, or None (near-ties counted)."""
        baseline, tolerance = self.baseline, self.tolerance
        baseline_top, test_top = baseline.top_logprobs[step], test.top_logprobs[step]
        baseline_lp, test_lp = dict(baseline_top), dict(test_top)
        diff = self.step_diff = max((abs(baseline_lp[t] - test_lp[t]) for t in baseline_lp.keys() & test_lp.keys()),
                                    default=0.0)
        baseline_token, test_token = _choice(baseline, step), _choice(test, step)
        if baseline_token != test_token:
            margin = _margin(baseline_top)
            parted = (f"baseline chose {baseline_token} ({_fmt(baseline_lp.get(baseline_token))}), test chose {test_token} "
                      f"({_fmt(test_lp.get(test_token))}); the baseline top-2 margin {margin:.3g} is")
            unranked = [f"{side} token {token} is not in the {other}'s top-k"
                        for side, token, other, other_lp in (("baseline", baseline_token, "test", test_lp),
                                                             ("test", test_token, "baseline", baseline_lp))
                        if token not in other_lp]
            if margin >= tolerance.tie_margin:
                return self.mismatch(step, test, f"{parted} at least the tie margin {tolerance.tie_margin:g}: "
                                                 "a decisive divergence")
            if unranked:
                return self.mismatch(step, test, f"{parted} below the tie margin {tolerance.tie_margin:g}, "
                                                 f"but {' and '.join(unranked)}")
        if diff > tolerance.logprob_atol:
            return self.mismatch(step, test, f"logprobs of a token both sides rank drifted by {diff:.3g} > "
                                             f"{tolerance.logprob_atol:g}")
        if baseline_token != test_token:
            self.ties += 1
            self.last_tie = self._at(step, test, "tie", f"{parted} below the tie margin {tolerance.tie_margin:g} "
                                                        "and each token is in the other's top-k: a near-tie")
            self.first_tie = self.first_tie or self.last_tie
        return None

    def mismatch(self, step: int, test: Generation, reason: str) -> Verdict:
        return self._at(step, test, "mismatch", reason)

    def _at(self, step: int, test: Generation, status: Status, reason: str) -> Verdict:
        baseline_top, test_top = self.baseline.top_logprobs[step], test.top_logprobs[step]
        baseline_token, test_token = _choice(self.baseline, step), _choice(test, step)
        return Verdict(
            self.baseline.rid, status, f"step {step}: {reason}", step=step, baseline_token=baseline_token,
            test_token=test_token, baseline_logprob=dict(baseline_top).get(baseline_token),
            test_logprob=dict(test_top).get(test_token), margin=_margin(baseline_top),
        )

    def verdict(self, end: Verdict | _Stop | None) -> Verdict:
        """The verdict once the walk ended at `end`, with what it compared and counted."""
        generated = len(self.baseline.output_ids)
        if isinstance(end, Verdict):
            verdict = end
        elif isinstance(end, _Stop):
            verdict = dataclasses.replace(self.first_tie or Verdict(self.baseline.rid, "tie", "", step=end.resume),
                                          resume_from=end.resume, force_from=end.force_from, reason=(
                f"{end.reason}; comparison stops here ({self.compared} of {generated} steps compared)"))
        elif self.ties or self.router_ties:
            verdict = dataclasses.replace(self.first_tie or Verdict(self.baseline.rid, "tie", ""), reason=(
                f"all {generated} steps compared: {self.ties} near-tie(s), {self.router_ties} router near-tie(s), "
                f"largest logprob difference {self.max_diff:.3g}"
                + (f"; the first at {self.first_tie.reason}" if self.first_tie else "")))
        else:
            verdict = Verdict(self.baseline.rid, "match", f"all {generated} tokens match; largest logprob difference "
                              f"{self.max_diff:.3g}")
        return dataclasses.replace(verdict, compared=self.compared, generated=generated, ties=self.ties,
                                   router_ties=self.router_ties, max_logprob_diff=self.max_diff,
                                   continued_by=list(self.methods))


def _record_problem(baseline: Generation, test: Generation) -> str | None:
    """Why the two records cannot be compared at all, or None."""
    for side, generation in (("baseline", baseline), ("test", test)):
        if generation.error is not None:
            return f"{side} rejected the request: {generation.error}"
        if len(generation.top_logprobs) != len(generation.output_ids):
            return (f"{side} recorded {len(generation.output_ids)} tokens but {len(generation.top_logprobs)} "
                    "top-k lists")
        if any(not top for top in generation.top_logprobs):
            return f"{side} recorded a step without top-k logprobs"
        if generation.routed_experts and not (
                len(generation.routed_experts) == len(generation.router_gaps) == len(generation.output_ids)):
            return (f"{side} recorded routing for {len(generation.routed_experts)} steps but "
                    f"{len(generation.output_ids)} tokens")
    if len(baseline.output_ids) != len(test.output_ids):
        # A near-tie excuses a token, never a wrong token count.
        return f"test produced {len(test.output_ids)} tokens, baseline {len(baseline.output_ids)}"
    if baseline.routed_experts and test.routed_experts and len(baseline.routed_experts[0]) != len(test.routed_experts[0]):
        return (f"test routed {len(test.routed_experts[0])} prompt tokens, baseline "
                f"{len(baseline.routed_experts[0])}")
    return None


def _segment_problem(baseline: Generation, test: Generation, segment: Segment, stop: _Stop) -> str | None:
    """Why `segment` cannot carry on the comparison that stopped at `stop` (its inputs are not the baseline's), or None."""
    if segment.method == "in_loop":
        if stop.force_from is None:
            return "cannot restore the inputs: no step to force from"
        return _continuation_problem(baseline, test, segment.test, stop.force_from)
    if (problem := _record_problem(segment.baseline, segment.test)) is not None:
        return f"cannot be compared: {problem}"
    for side, spliced, before in (("baseline", segment.baseline, baseline), ("test", segment.test, test)):
        if spliced.output_ids[:segment.start] != before.output_ids[:segment.start]:
            return f"does not follow the {side}'s tokens before step {segment.start}"
    return None


def _continuation_problem(baseline: Generation, test: Generation, continuation: Generation, force_from: int) -> str | None:
    """Why the test's re-run forced in its loop cannot continue the comparison (its inputs are not the baseline's),
    or None."""
    if continuation.error is not None:
        return f"was rejected: {continuation.error}"
    if continuation.forced_from != force_from:
        return f"says it was forced from step {continuation.forced_from}"
    if (problem := _record_problem(baseline, continuation)) is not None:
        return f"cannot be compared: {problem.replace('test', 're-run')}"
    for step, (ran, first, fed) in enumerate(zip(continuation.output_ids, test.output_ids, baseline.output_ids)):
        if step < force_from and ran != first:
            return f"chose token {ran} at step {step}, where the first run chose {first} on the same inputs"
        if step >= force_from and ran != fed:
            return f"fed token {ran} at step {step}, not the baseline's {fed}"
    return None


def _choice(generation: Generation, step: int) -> int:
    """The token a side chose at `step`: the one it fed, or where it was forced, its own top-1."""
    return generation.output_ids[step] if generation.chose(step) else generation.top_logprobs[step][0][0]


def _margin(top: list[tuple[int, float]]) -> float:
    return top[0][1] - top[1][1] if len(top) >= 2 else float("inf")


def _inconsistency(side: str, token: int, top: list[tuple[int, float]]) -> str | None:
    """Why `token` cannot be the greedy choice recorded with `top`, or None if it can."""
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
