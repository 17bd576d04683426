"""Drift statistics over the compared steps, judged as a distribution against the noise profiles of correct runs,
and against the figures a precision baseline stores; on hand-built distributions."""
import json
import math

import pytest

from harness.inputs.scenarios import Scenario
from harness.verdicts.compare import Segment, compare_generation
from harness.verdicts.drift import MARGIN_BINS, DriftStats, StepDrift, step_drift
from harness.verdicts.drift_baseline import DRIFT_GROWTH, DriftBaseline, StoredDrift
from harness.verdicts.noise import HEADROOM, JUDGED, MIN_STEPS, NoiseProfile, judge_drift, noise_profile
from harness.verdicts.tolerances import Tolerance
from reference_runner.engine.args import EngineArgs
from reference_runner.records import Generation

TOL = Tolerance(logprob_atol=0.5, tie_margin=0.2)


def gen(*steps: list[tuple[int, float]]) -> Generation:
    generation = Generation("r0")
    for top in steps:
        generation.append(top[0][0], top, in_graph=False)
    return generation


def test_a_step_drifts_by_the_logprob_difference_of_the_baseline_token():
    drift = step_drift([(5, -0.25), (6, -2.0)], [(5, -0.375), (6, -1.5)], baseline_token=5, test_token=5)
    assert (drift.abs_diff, drift.flipped, drift.margin) == (0.125, False, 1.75)


def test_identical_distributions_have_no_kl_divergence():
    top = [(5, -0.25), (6, -2.0), (7, -3.0)]
    assert step_drift(top, top, 5, 5).kl == 0.0


def test_the_kl_divergence_is_taken_over_the_tokens_both_sides_rank_each_renormalised():
    baseline = [(5, math.log(0.6)), (6, math.log(0.2)), (7, math.log(0.2))]
    test = [(5, math.log(0.4)), (6, math.log(0.4)), (9, -9.0)]
    p, q = (0.75, 0.25), (0.5, 0.5)  # tokens 5 and 6, renormalised on each side
    assert step_drift(baseline, test, 5, 5).kl == pytest.approx(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)))


def test_a_flip_records_the_baseline_margin():
    drift = step_drift([(7, -0.70), (8, -0.75)], [(8, -0.70), (7, -0.72)], baseline_token=7, test_token=8)
    assert (drift.flipped, drift.margin, drift.abs_diff) == (True, pytest.approx(0.05), pytest.approx(0.02))


def test_statistics_pool_the_steps_mean_99th_percentile_by_nearest_rank_and_max():
    samples = [StepDrift(abs_diff=i / 100, flipped=False, margin=1.0, kl=i / 1000) for i in range(1, 201)]
    stats = DriftStats.of(samples)
    assert (stats.steps, stats.mean_abs_diff, stats.p99_abs_diff, stats.max_abs_diff) == (200, pytest.approx(1.005), 1.98, 2.0)
    assert (stats.mean_kl, stats.p99_kl, stats.max_kl) == (pytest.approx(0.1005), 0.198, 0.2)


def test_flips_are_counted_by_baseline_margin_and_lower_the_top1_agreement():
    margins = [0.001, 0.05, 0.05, 0.2, 0.5, 2.0]
    samples = [StepDrift(0.0, True, m, 0.0) for m in margins] + [StepDrift(0.0, False, 0.01, 0.0)] * 94
    stats = DriftStats.of(samples)
    assert dict(zip(MARGIN_BINS, stats.flips)) == {"<0.01": 1, "<0.1": 2, "<0.3": 1, "<1": 1, ">=1": 1}
    assert (stats.top1_agreement, stats.flip_rate) == (pytest.approx(0.94), pytest.approx(0.06))


def test_no_compared_step_is_no_drift_over_zero_steps():
    assert DriftStats.of([]) == DriftStats(0)
    assert DriftStats(0).summary() == "no step compared"


def test_statistics_survive_a_json_round_trip():
    stats = DriftStats.of([StepDrift(0.5, True, 0.05, 0.01), StepDrift(0.25, False, 1.5, 0.002)])
    assert DriftStats.from_dict(json.loads(json.dumps(stats.as_dict()))) == stats


def test_a_verdict_records_the_drift_of_every_step_it_compared_and_only_those():
    a, near, flipped, b = [(5, -0.5), (6, -1.5)], [(7, -0.70), (8, -0.75)], [(8, -0.70), (7, -0.72)], [(9, -0.1), (3, -3.0)]
    baseline, test = gen(a, near, b), gen(a, flipped, b)
    free = compare_generation(baseline, test, tolerance=TOL)
    assert (free.compared, [s.flipped for s in free.drift]) == (2, [False, True])
    forced = Generation("r0", [5, 7, 9], [a, flipped, b], [False] * 3, forced_from=1)
    continued = compare_generation(baseline, test, tolerance=TOL, segments=[Segment(2, baseline, forced, "in_loop")])
    assert (continued.compared, [s.flipped for s in continued.drift]) == (3, [False, True, False])
    assert "drift" not in continued.as_dict()


PROFILE = NoiseProfile("reference/cpu/bfloat16/across_kernels", scenarios=40,
                       worst={"mean_abs_diff": 0.05, "p99_abs_diff": 0.3, "max_abs_diff": 1.0, "mean_kl": 0.005,
                              "p99_kl": 0.04, "flip_rate": 0.05})
WHERE = PROFILE.key


def drift(steps: int = 200, **stats) -> DriftStats:
    return DriftStats(steps, **{"flips": (0,) * len(MARGIN_BINS), **stats})


def test_drift_within_every_bound_passes():
    assert judge_drift(drift(mean_abs_diff=0.09, mean_kl=0.009), PROFILE, WHERE) == (
        "within the noise profile reference/cpu/bfloat16/across_kernels", [])


def test_a_statistic_beyond_its_bound_is_a_systematic_drift_naming_statistic_value_and_bound():
    judged, failures = judge_drift(drift(mean_kl=0.0125), PROFILE, WHERE)
    assert judged == "1 of 5 statistics beyond the noise profile reference/cpu/bfloat16/across_kernels"
    assert failures == [
        "systematic drift: mean KL divergence 0.0125 over 200 compared steps is above the bound 0.01 (2x 0.005, the "
        "worst of 40 correct bfloat16 scenarios across kernels on cpu, reference target)"]


def test_the_flip_rate_may_exceed_twice_the_worst_by_three_flips_as_flips_are_few():
    within, beyond = (drift(flips=(n, 0, 0, 0, 0)) for n in (22, 24))  # the bound: 2 x 0.05 x 200 + 3 flips
    assert judge_drift(within, PROFILE, WHERE)[1] == []
    assert judge_drift(beyond, PROFILE, WHERE)[1] == [
        "systematic drift: top-1 flip rate 0.12 over 200 compared steps is above the bound 0.115 (2x 0.05, the worst of "
        "40 correct bfloat16 scenarios across kernels on cpu, reference target, plus 3 flips)"]


def test_too_few_steps_are_not_judged_as_a_distribution():
    assert judge_drift(drift(MIN_STEPS - 1, mean_kl=1.0), PROFILE, WHERE) == (
        f"not judged: {MIN_STEPS - 1} steps compared, fewer than the {MIN_STEPS} a distribution needs", [])


def test_without_a_measured_profile_the_drift_is_reported_not_judged():
    assert judge_drift(drift(mean_kl=1.0), None, "vllm/cpu/bfloat16/across_kernels") == (
        "not judged: no noise profile measured for vllm/cpu/bfloat16/across_kernels", [])


MEASURED_DTYPES = ["bfloat16", "float16"]  # float32 is not measured yet: its scenarios are reported, not judged


@pytest.mark.parametrize("dtype", MEASURED_DTYPES)
@pytest.mark.parametrize("pair", ["same_kernels", "across_kernels"])
def test_the_reference_target_on_the_cpu_has_a_measured_profile_for_the_half_precision_dtypes_and_every_pair(dtype, pair):
    profile = noise_profile("reference", "cpu", dtype, pair)
    assert profile is not None and profile.scenarios >= 8
    assert {name: profile.bound(name, 300) for name in JUDGED} == {
        name: HEADROOM * profile.worst[name] + (3 / 300 if name == "flip_rate" else 0) for name in JUDGED}


@pytest.mark.parametrize("dtype", MEASURED_DTYPES)
def test_graph_against_eager_on_the_cpu_drifts_by_nothing_where_it_is_bit_identical(dtype):
    assert set(noise_profile("reference", "cpu", dtype, "same_kernels").worst.values()) == {0.0}


SCENARIO = Scenario("llama", "eager", EngineArgs(mode="compile", dtype="bfloat16"))
STORED = drift(400, mean_abs_diff=0.04, p99_abs_diff=0.2, mean_kl=0.004, p99_kl=0.03, flips=(4, 4, 2, 0, 0),
               top1_agreement=0.975)


MACHINE = "x86_64 AVX2, 2 threads"


def baseline(tmp_path, *records: StoredDrift) -> DriftBaseline:
    path = tmp_path / "drift.json"
    path.write_bytes(DriftBaseline(path).merged(list(records)))
    return DriftBaseline.load(path)


def stored(scenario: Scenario = SCENARIO, stats: DriftStats = STORED) -> StoredDrift:
    return StoredDrift(scenario, "cpu", "reference", MACHINE, stats, {"torch": "2.13.0+cpu", "date": "2026-12-08"})


def test_drift_within_the_growth_factor_of_its_stored_figure_passes(tmp_path):
    same = drift(400, mean_abs_diff=0.04 * DRIFT_GROWTH, p99_abs_diff=0.2, mean_kl=0.004, p99_kl=0.03,
                 flips=(6, 6, 3, 0, 0), top1_agreement=0.9625)
    judged, failures = baseline(tmp_path, stored()).judge(SCENARIO, "cpu", "reference", MACHINE, same)
    assert (judged, failures) == (f"within {DRIFT_GROWTH:g}x the figures stored in {tmp_path / 'drift.json'}", [])


def test_drift_grown_beyond_the_factor_fails_naming_the_statistic_and_the_stored_figure(tmp_path):
    grown = drift(400, mean_abs_diff=0.04, p99_abs_diff=0.2, mean_kl=0.0065, p99_kl=0.03, flips=(4, 4, 2, 0, 0))
    _, failures = baseline(tmp_path, stored()).judge(SCENARIO, "cpu", "reference", MACHINE, grown)
    assert failures == [
        f"drift grew beyond the baseline: mean KL divergence 0.0065 over 400 compared steps is above the bound 0.006 "
        f"({DRIFT_GROWTH:g}x 0.004, stored in {tmp_path / 'drift.json'} by torch 2.13.0+cpu on 2026-12-08)"]


def test_flips_may_grow_by_three_more_than_the_factor_allows(tmp_path):
    store = baseline(tmp_path, stored())
    within, beyond = (drift(400, flips=(n, 0, 0, 0, 0)) for n in (17, 19))  # the limit: 1.5 x 10 + 3 flips
    assert store.judge(SCENARIO, "cpu", "reference", MACHINE, within)[1] == []
    assert len(store.judge(SCENARIO, "cpu", "reference", MACHINE, beyond)[1]) == 1


@pytest.mark.parametrize("other", [
    {"scenario": Scenario("llama", "eager", EngineArgs(mode="compile", dtype="float16"))},
    {"scenario": Scenario("llama", "eager", EngineArgs(mode="compile", dtype="bfloat16"), seed=1)},
    {"device": "npu"}, {"target": "vllm"}, {"machine": "x86_64 AVX2, 1 threads"}])
def test_a_scenario_is_judged_only_against_the_figure_of_the_same_scenario_device_target_and_machine(tmp_path, other):
    record = StoredDrift(**{**stored().__dict__, **other})
    judged, failures = baseline(tmp_path, record).judge(SCENARIO, "cpu", "reference", MACHINE, drift(400, mean_kl=1.0))
    assert (judged, failures) == (
        f"no figure stored in {tmp_path / 'drift.json'} for this scenario on reference, cpu, {MACHINE}", [])


def test_recording_replaces_the_figure_of_the_same_scenario_and_keeps_the_others(tmp_path):
    other = Scenario("qwen2_moe", "eager", EngineArgs(mode="compile", dtype="bfloat16"))
    store = baseline(tmp_path, stored(), stored(other))
    newer = stored(stats=drift(400, mean_kl=0.5))
    store.path.write_bytes(store.merged([newer]))
    reread = DriftBaseline.load(store.path)
    assert [r.scenario for r in reread.records] == [other, SCENARIO]
    assert reread.stored(SCENARIO, "cpu", "reference", MACHINE) == newer


def test_a_file_of_another_kind_is_no_drift_baseline(tmp_path):
    path = tmp_path / "check.json"
    path.write_text(json.dumps({"scenarios": []}))
    with pytest.raises(ValueError, match="not a drift baseline"):
        DriftBaseline.load(path)
