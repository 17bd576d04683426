"""Measure the noise profiles of correct runs (harness/verdicts/noise.py) and write harness/verdicts/noise_profiles.json.

    python scripts/measure_noise_profiles.py [--device cpu] [--dtypes bfloat16,float16] [--details FILE]

Runs the reference target, unpatched, on the calibration scenarios (`calibration`: built-in checkpoints and
smollm2, workloads, seeds 0 and 1) through the same Judge as `npugraph-harness check`, and takes per target, device,
dtype and kernel pair the worst value of each drift statistic; then runs the held-out scenarios (`held_out`: seeds
2 and 3) and records which of them the new bounds would fail (none may). Each scenario's statistics go to
`--details` (JSON lines) as it ends, and a scenario found there is not run again: an interrupted run resumes.
On a shared 2-core CPU the default set takes a few hours, compile mode above all; `--dtypes` and `--models` split it.
float32 is left out unless named: its noise depends on the thread count, and a profile holds for every machine.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

from harness.inputs.scenarios import Scenario
from harness.verdicts.drift import LABELS, DriftStats
from harness.verdicts.noise import JUDGED, MIN_STEPS, PROFILES, NoiseProfile, profile_key
from reference_runner.engine.args import EngineArgs

BUILTINS = ["llama", "qwen2", "qwen2_moe", "mixtral", "llama_kv1", "llama_hd32", "qwen3", "qwen3_moe"]
# (baseline, mode): eager against transformers and compiled against eager run other kernels; graph against eager
# the same ones.
PAIRS = [("oracle", "eager"), ("eager", "compile"), ("eager", "graph")]


def scenarios(models: list[str], dtypes: list[str], seeds: list[int], workloads: list[str], tokens: int) -> list[Scenario]:
    return [Scenario(model, baseline, EngineArgs(mode=mode, dtype=dtype), workload, tokens, seed)
            for dtype in dtypes for model in models for baseline, mode in PAIRS for workload in workloads
            for seed in seeds]


def calibration(models: list[str], dtype: str, workloads: list[str]) -> list[Scenario]:
    """Built-in checkpoints at 64 tokens: `workloads` (default mixed and join_leave), seeds 0 and 1 (float32, whose
    drift is a thousandth of bfloat16's: seed 0); smollm2, a trained model with flatter distributions, whose 30 layers
    take minutes to compile: mixed, seed 0, 32 tokens."""
    builtins = [m for m in models if m != "smollm2"]
    return [*scenarios(builtins, [dtype], [0] if dtype == "float32" else [0, 1], workloads, 64),
            *(scenarios(["smollm2"], [dtype], [0], ["mixed"], 32) if "smollm2" in models else [])]


def held_out(models: list[str], dtype: str) -> list[Scenario]:
    """Seeds never calibrated on, workload mixed: seed 2 at the check's default 32 tokens and at 64 (the precision
    suite's scenarios), smollm2 seed 1, then seed 3 at 32 tokens; float32: seed 2 at 32 tokens."""
    builtins = [m for m in models if m != "smollm2"]
    if dtype == "float32":
        return scenarios(builtins, [dtype], [2], ["mixed"], 32)
    return [*scenarios(builtins, [dtype], [2], ["mixed"], 32), *scenarios(builtins, [dtype], [2], ["mixed"], 64),
            *(scenarios(["smollm2"], [dtype], [1], ["mixed"], 32) if "smollm2" in models else []),
            *scenarios(builtins, [dtype], [3], ["mixed"], 32)]


def key_of(scenario: Scenario) -> str:
    return json.dumps(scenario.as_dict(), sort_keys=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", default="bfloat16,float16")
    parser.add_argument("--models", default=",".join([*BUILTINS, "smollm2"]))
    parser.add_argument("--workloads", default="mixed,join_leave", help="the built-ins' calibration workloads")
    parser.add_argument("--details", type=Path, default=Path("results/noise-profiles.jsonl"),
                        help="each scenario's statistics, one JSON line each, written as it ends (resumes from it)")
    parser.add_argument("--out", type=Path, default=PROFILES)
    parser.add_argument("--measure-only", action="store_true", help="run the scenarios, write --details, not --out")
    parser.add_argument("--write-only", action="store_true",
                        help="run nothing: write --out from the scenarios --details holds (a profile counts those)")
    args = parser.parse_args()
    dtypes, models, workloads = args.dtypes.split(","), args.models.split(","), args.workloads.split(",")

    from harness.judge import Judge, kernel_pair
    from harness.targets import get_target

    judge = Judge(get_target("reference", args.device), progress=lambda line: print(line, file=sys.stderr, flush=True))
    args.details.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if args.details.exists():
        for line in args.details.read_text().splitlines():
            record = json.loads(line)
            done[record["key"]] = record
    plan = [(role, s) for dtype in dtypes for role, made in (("calibration", calibration(models, dtype, workloads)),
                                                             ("held_out", held_out(models, dtype))) for s in made]
    for i, (role, scenario) in enumerate(plan, 1):
        if key_of(scenario) in done or args.write_only:
            continue
        start = time.perf_counter()
        result = judge.run(scenario)
        record = {"key": key_of(scenario), "role": role, "name": scenario.name, "dtype": scenario.engine.dtype,
                  "seed": scenario.seed, "tokens": scenario.max_new_tokens,
                  "profile": profile_key("reference", args.device, scenario.engine.dtype, kernel_pair(scenario)),
                  "passed_per_step": not [f for f in result.failures if not f.startswith("systematic drift")],
                  "failures": result.failures, "drift": result.drift.as_dict(), "seconds": round(time.perf_counter() - start, 1)}
        done[record["key"]] = record
        with args.details.open("a") as details:
            details.write(json.dumps(record) + "\n")
        print(f"[{i}/{len(plan)}] {role} {scenario.name} {scenario.engine.dtype} seed {scenario.seed}: "
              f"{result.drift.summary()} ({record['seconds']}s)", file=sys.stderr, flush=True)
    if not args.measure_only:
        write_profiles(args.out, [r for r in done.values() if r["dtype"] in dtypes], models, dtypes, args.device)
    return 0


def beyond(profile: NoiseProfile, record: dict) -> list[str]:
    """The statistics of `record` beyond the bounds of `profile`."""
    drift = DriftStats.from_dict(record["drift"])
    return [name for name in JUDGED if drift.statistic(name) > profile.bound(name, drift.steps)]


def write_profiles(out: Path, records: list[dict], models: list[str], dtypes: list[str], device: str) -> None:
    """The worst value of each statistic per profile over the calibration records, and what the held-out ones show."""
    import torch

    by_profile: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        if record["drift"]["steps"] >= MIN_STEPS:
            by_profile[record["profile"]][record["role"]].append(record)
    profiles = {}
    for key, roles in sorted(by_profile.items()):
        calibrated = roles["calibration"]
        worst = {name: max(DriftStats.from_dict(r["drift"]).statistic(name) for r in calibrated) for name in LABELS}
        held, profile = roles["held_out"], NoiseProfile(key, len(calibrated), worst)
        failing = [f"{r['name']} seed {r['seed']}, {r['tokens']} tokens" for r in held if beyond(profile, r)]
        calibrated_on = [json.loads(r["key"]) for r in calibrated]
        profiles[key] = {
            "scenarios": len(calibrated), "steps": sum(r["drift"]["steps"] for r in calibrated),
            "calibrated_on": {field: sorted({str(s[field]) for s in calibrated_on}) for field in ("model", "workload", "seed")},
            "worst": {name: float(f"{value:.4g}") for name, value in worst.items()},
            "held_out": {"scenarios": len(held), "beyond_bounds": failing,
                         "worst": {name: float(f"{max(DriftStats.from_dict(r['drift']).statistic(name) for r in held):.4g}")
                                   for name in LABELS} if held else {}},
        }
    doc = {
        "how": ("scripts/measure_noise_profiles.py: the reference target, unpatched, through the check's Judge; per "
                "profile the worst value of each statistic over its calibration scenarios with at least "
                f"{MIN_STEPS} compared steps. Calibration: built-in checkpoints x (eager vs transformers, compile vs "
                "eager, graph vs eager) x workloads (each profile's calibrated_on) x seeds 0 and 1 (float32: seed 0), 64 "
                "tokens; "
                "smollm2 mixed, seed 0, 32 tokens. Held out: workload mixed, seed 2 at 32 and 64 tokens and seed 3 "
                "at 32 (float32: seed 2 at 32); smollm2 seed 1."),
        "measured": {"date": datetime.date.today().isoformat(), "device": device, "torch": torch.__version__,
                     "cpu": platform.processor() or platform.machine(), "models": models, "dtypes": dtypes},
        "profiles": profiles,
    }
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}: {len(profiles)} profiles", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
