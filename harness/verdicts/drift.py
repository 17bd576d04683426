"""Drift statistics of a scenario: how far the test's distributions lie from the baseline's, over the steps compared.

Per compared step (`StepDrift`): the logprob difference of the baseline's token, whether the two top-1 choices
differ (a near-tie flip) and at what baseline top-2 margin, and the KL divergence of the two distributions over the
top-k tokens both sides rank (each renormalised over those tokens), as llama.cpp's `--kl-divergence` computes it
over the whole vocabulary. Per scenario (`DriftStats`): their mean, 99th percentile and maximum, the top-1 agreement
and the flips counted by margin. A correct run scatters these around zero; a bug that shifts every step a little
moves the whole distribution, which `noise.py` judges against the profile of correct runs.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

# Flips are counted by the baseline's top-2 margin, in the bins these edges bound: float noise flips near-ties at
# the smallest margins; a fault that lifts a token flips at margins up to its size.
MARGIN_EDGES = (0.01, 0.1, 0.3, 1.0)
MARGIN_BINS = (*(f"<{edge:g}" for edge in MARGIN_EDGES), f">={MARGIN_EDGES[-1]:g}")


@dataclass(frozen=True)
class StepDrift:
    """One compared step: |test - baseline| logprob of the baseline's token, whether the choices differ, the
    baseline's top-2 margin, and KL(baseline || test) over the top-k both sides rank."""

    abs_diff: float
    flipped: bool
    margin: float
    kl: float


def step_drift(baseline_top: list[tuple[int, float]], test_top: list[tuple[int, float]], baseline_token: int,
               test_token: int) -> StepDrift:
    """The drift of one step whose two distributions were compared (the baseline's token is in both top-k lists)."""
    baseline_lp, test_lp = dict(baseline_top), dict(test_top)
    shared = baseline_lp.keys() & test_lp.keys()
    margin = baseline_top[0][1] - baseline_top[1][1] if len(baseline_top) >= 2 else math.inf
    return StepDrift(abs(test_lp[baseline_token] - baseline_lp[baseline_token]), baseline_token != test_token, margin,
                     _shared_kl([baseline_lp[t] for t in shared], [test_lp[t] for t in shared]))


def _shared_kl(p_logprobs: list[float], q_logprobs: list[float]) -> float:
    """KL(p || q) of two distributions given by logprobs over the same tokens, each renormalised over them."""
    p_norm, q_norm = _logsumexp(p_logprobs), _logsumexp(q_logprobs)
    kl = sum(math.exp(p - p_norm) * ((p - p_norm) - (q - q_norm)) for p, q in zip(p_logprobs, q_logprobs))
    return max(kl, 0.0)  # rounding may leave -1e-17 where both agree


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


@dataclass(frozen=True)
class DriftStats:
    """A scenario's drift over its `steps` compared steps (`StepDrift`, pooled over its requests)."""

    steps: int
    mean_abs_diff: float = 0.0
    p99_abs_diff: float = 0.0
    max_abs_diff: float = 0.0
    top1_agreement: float = 1.0
    flips: tuple[int, ...] = (0,) * len(MARGIN_BINS)  # by baseline margin, in MARGIN_BINS
    mean_kl: float = 0.0
    p99_kl: float = 0.0
    max_kl: float = 0.0

    @classmethod
    def of(cls, samples: list[StepDrift]) -> DriftStats:
        if not samples:
            return cls(0)
        diffs, kls = [s.abs_diff for s in samples], [s.kl for s in samples]
        flips = [0] * len(MARGIN_BINS)
        for s in samples:
            if s.flipped:
                flips[sum(s.margin >= edge for edge in MARGIN_EDGES)] += 1
        return cls(len(samples), _mean(diffs), _p99(diffs), max(diffs), 1 - sum(flips) / len(samples), tuple(flips),
                   _mean(kls), _p99(kls), max(kls))

    @property
    def flip_rate(self) -> float:
        """The share of compared steps whose two top-1 choices differ (near-tie flips): 1 - top-1 agreement."""
        return sum(self.flips) / self.steps if self.steps else 0.0

    def statistic(self, name: str) -> float:
        """A statistic by name: a field, or `flip_rate`."""
        return getattr(self, name)

    def as_dict(self) -> dict:
        return {**asdict(self), "flips": dict(zip(MARGIN_BINS, self.flips))}

    @classmethod
    def from_dict(cls, d: dict) -> DriftStats:
        """The inverse of `as_dict` (after a JSON round trip)."""
        return cls(**{**d, "flips": tuple(d["flips"][b] for b in MARGIN_BINS)})

    def summary(self) -> str:
        """One line: what each statistic measured, over how many steps."""
        if not self.steps:
            return "no step compared"
        flips = ", ".join(f"{n} at margin {b}" for b, n in zip(MARGIN_BINS, self.flips) if n) or "none"
        return (f"{self.steps} steps: |dlogprob| mean {self.mean_abs_diff:.3g} p99 {self.p99_abs_diff:.3g} max "
                f"{self.max_abs_diff:.3g}; top-1 agreement {self.top1_agreement:.1%} (flips: {flips}); KL mean "
                f"{self.mean_kl:.3g} p99 {self.p99_kl:.3g} max {self.max_kl:.3g}")


NOTHING_COMPARED = DriftStats(0)

# Flips come whole, and few where drift is small: this many more than a rate allows are chance, not drift.
FLIP_SLACK = 3


def allowed(name: str, figure: float, factor: float, steps: int) -> float:
    """The most statistic `name` may reach over `steps` compared steps against `figure`: `factor` times it, and for
    the flip rate FLIP_SLACK flips more."""
    return factor * figure + (FLIP_SLACK / steps if name == "flip_rate" and steps else 0.0)


def beyond(drift: DriftStats, figures: dict[str, float], factor: float, failure: str, source: str) -> list[str]:
    """A failure per statistic of `figures` that `drift` takes beyond what `allowed` lets it reach against its figure,
    naming the statistic, its value, the bound and where the figure comes from (`source`)."""
    return [f"{failure}: {LABELS[name]} {drift.statistic(name):.3g} over {drift.steps} compared steps is above the bound "
            f"{bound:.3g} ({factor:g}x {figure:.3g}, {source}{f', plus {FLIP_SLACK} flips' if name == 'flip_rate' else ''})"
            for name, figure in figures.items() if drift.statistic(name) > (bound := allowed(name, figure, factor, drift.steps))]


# What each judged statistic is called in a failure, a report and the README.
LABELS = {"mean_abs_diff": "mean |delta logprob|", "p99_abs_diff": "99th percentile |delta logprob|",
          "mean_kl": "mean KL divergence", "p99_kl": "99th percentile KL divergence", "flip_rate": "top-1 flip rate"}


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values)


def _p99(values: list[float]) -> float:
    """The 99th percentile by nearest rank: the smallest value at least 99% of the values do not exceed."""
    ranked = sorted(values)
    return ranked[math.ceil(0.99 * len(ranked)) - 1]
