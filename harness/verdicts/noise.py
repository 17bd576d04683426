"""Drift judged as a distribution: a scenario's drift statistics against the noise profile of correct runs.

A per-step tolerance (`tolerances.py`) must admit the largest drift one correct step shows; a fault that shifts
every step by less passes it. Its statistics over a scenario's steps do not: the profile of each target, device,
dtype and pair of kernels holds the worst value of each statistic that correct runs showed (built-in checkpoints
and smollm2, workloads and seeds; other seeds held out for validation), and a scenario fails with "systematic
drift" where a statistic lies beyond the profile's bound, `HEADROOM` times that worst value. The figures, and
how they were measured, are in `noise_profiles.json`, written by `scripts/measure_noise_profiles.py`.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from harness.verdicts.drift import DriftStats, allowed, beyond

if TYPE_CHECKING:  # tolerances imports torch, which the command line's option checks must not
    from harness.verdicts.tolerances import KernelPair

PROFILES = Path(__file__).with_name("noise_profiles.json")
# The statistics judged: each mean moves with a fault that shifts every step; the 99th percentile with one that
# strikes a few percent of them; the flip rate with one that reorders near-ties. The maxima are the per-step
# tolerance's to judge.
JUDGED = ("mean_abs_diff", "p99_abs_diff", "mean_kl", "p99_kl", "flip_rate")
HEADROOM = 2.0  # a bound is this many times the worst value measured on correct runs (the flip rate: and 3 flips)
# Fewer steps than this are too few for a distribution: a statistic of 50 steps scatters too widely to judge.
MIN_STEPS = 100


@dataclass(frozen=True)
class NoiseProfile:
    """How far correct runs of one target, device, dtype and kernel pair drift: the worst value of each statistic
    over `scenarios` calibration scenarios, and the bound a scenario must stay within."""

    key: str
    scenarios: int
    worst: dict[str, float]

    def bound(self, name: str, steps: int) -> float:
        """The most statistic `name` may reach over `steps` compared steps."""
        return allowed(name, self.worst[name], HEADROOM, steps)

    def describe(self) -> str:
        target, device, dtype, pair = self.key.split("/")
        return f"{self.scenarios} correct {dtype} scenarios {pair.replace('_', ' ')} on {device}, {target} target"


def profile_key(target: str, device: str, dtype: str, pair: KernelPair) -> str:
    return f"{target}/{device}/{dtype}/{pair}"


@functools.cache
def _stored(path: Path = PROFILES) -> dict[str, NoiseProfile]:
    if not path.is_file():  # before the first measurement
        return {}
    doc = json.loads(path.read_text())
    return {key: NoiseProfile(key, p["scenarios"], p["worst"]) for key, p in doc["profiles"].items()}


def noise_profile(target: str, device: str, dtype: str, pair: KernelPair) -> NoiseProfile | None:
    """The stored profile of correct runs of `target` on `device` in `dtype` across `pair`, or None if unmeasured."""
    return _stored().get(profile_key(target, device, dtype, pair))


def judge_drift(drift: DriftStats, profile: NoiseProfile | None, where: str) -> tuple[str, list[str]]:
    """How `drift` was judged against `profile` (or why not), and a "systematic drift" failure per statistic beyond
    its bound, naming the statistic, its value and the bound."""
    if profile is None:
        return f"not judged: no noise profile measured for {where}", []
    if drift.steps < MIN_STEPS:
        return f"not judged: {drift.steps} steps compared, fewer than the {MIN_STEPS} a distribution needs", []
    failures = beyond(drift, {name: profile.worst[name] for name in JUDGED}, HEADROOM, "systematic drift",
                      f"the worst of {profile.describe()}")
    return f"{within_or_beyond(failures)} the noise profile {profile.key}", failures


def within_or_beyond(failures: list[str]) -> str:
    """How the judged statistics fared: "within", or how many of them failed."""
    return f"{len(failures)} of {len(JUDGED)} statistics beyond" if failures else "within"
