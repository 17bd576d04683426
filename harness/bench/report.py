"""`npugraph-harness report RESULTS`: a markdown summary and a PNG chart of benchmark (and check) results.

RESULTS is pytest-benchmark's JSON (`--benchmark-json`) or a folder holding `bench.json` and, if the
correctness check ran, `check.json`. Throughput is compared with this machine class's stored
baseline and speed-ups with `baselines/ratios-<device>.json`, when they exist.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.bench.results import (
    BASELINES,
    GOALS,
    BenchResult,
    CostRatio,
    load_ratios,
    load_results,
    machine_class,
    ratio_gate,
    ratios_path,
    speedups,
)
from harness.exits import UsageError
from harness.inputs.scenarios import Scenario
from harness.verdicts.drift import LABELS, DriftStats
from harness.verdicts.drift_baseline import DRIFT_GROWTH, DriftBaseline, growth_limit
from reference_runner.engine.args import MODES

BENCH_MODES = (*MODES, "hf")  # hf: Hugging Face generate, the peer of the loop benchmark
COLORS = {"eager": "#7f7f7f", "graph": "#1f77b4", "compile": "#2ca02c", "tree": "#9467bd", "hf": "#ff7f0e"}
KINDS = {"step": "one decode step", "loop": "32-token generate"}


def stored_baseline(machine_info: dict) -> Path | None:
    """The newest stored pytest-benchmark file of the machine class that produced `machine_info`."""
    info, arch = machine_info.get("npugraph", {}), machine_info.get("machine")
    version = ".".join(machine_info.get("python_version", "").split(".")[:2])
    machine_id = f"{machine_info.get('system')}-{machine_info.get('python_implementation')}-{version}-*"
    folder = BASELINES / machine_class(info.get("device"), info.get("device_name", "?"), arch)
    files = sorted(folder.glob(f"{machine_id}/[0-9][0-9][0-9][0-9]_*.json"))
    return files[-1] if files else None


def render_markdown(results: list[BenchResult], machine_info: dict, baseline: list[BenchResult],
                    stored_ratios: dict[str, float], tolerance: float, check: dict | None, sources: dict[str, str],
                    cost_ratios: list[CostRatio] = ()) -> str:
    """The summary: correctness verdicts, the time to a verdict, then per model and kind a row per batch size and
    mode."""
    info = machine_info.get("npugraph", {})
    device = info.get("device", "?")
    lines = ["# npugraph-harness results", "",
             f"Machine: {info.get('device_name', '?')} ({device}), torch {info.get('torch', '?')}, "
             f"{info.get('threads', '?')} thread(s), one rank.", ""]
    lines += [f"- {what}: `{path}`" for what, path in sources.items()] + [""]
    if check is not None:
        lines += _check_section(check)
    lines += _cost_section(cost_ratios)
    measured = speedups(results)
    checks = {c.key: c for c in ratio_gate(measured, stored_ratios, tolerance)}
    base = {r.key: r for r in baseline}
    lines += ["## Throughput", "",
              "*tok/s* at the median round; *vs baseline*: change of tok/s against the stored run of this machine "
              "class; *speed-up*: eager's time over the mode's, fastest rounds, with eager run between the mode's "
              f"rounds; *gate* (decode steps): the speed-up against the stored one, failing below {1 - tolerance:.0%} "
              "of it.", ""]
    for model in dict.fromkeys(r.model for r in results):
        for kind, title in KINDS.items():
            rows = sorted((r for r in results if (r.model, r.kind) == (model, kind)),
                          key=lambda r: (r.bs, BENCH_MODES.index(r.mode)))
            if not rows:
                continue
            lines += [f"### {model}: {title}", "",
                      "| bs | mode | median ms | tok/s | vs baseline | speed-up | gate |", "|---:|---|---:|---:|---:|---:|---|"]
            for r in rows:
                b = base.get(r.key)
                delta = f"{r.tokens_per_s / b.tokens_per_s - 1:+.0%}" if b else "-"
                speedup = f"{measured[r.key]:.2f}x" if r.key in measured else "1x" if r.mode == "eager" else "-"
                gate = checks.get(r.key)
                verdict = "-" if gate is None else f"{'ok' if gate.passed else '**FAIL**'} (stored {gate.stored:.2f}x)"
                lines.append(f"| {r.bs} | {r.mode} | {r.median_s * 1e3:.3f} | {r.tokens_per_s:,.0f} | {delta} | "
                             f"{speedup} | {verdict} |")
            lines.append("")
    lines += _goals_section(results, device)
    failed = [c for c in checks.values() if not c.passed]
    gate_line = (f"{len(failed)} of {len(checks)} speed-ups FAILED the ratio gate: " + ", ".join(c.key for c in failed)
                 if failed else f"all {len(checks)} gated speed-ups within tolerance" if checks else "no ratio gate")
    lines += ["## Ratio gate", "", gate_line, ""]
    return "\n".join(lines)


def _check_section(check: dict) -> list[str]:
    scenarios = check.get("scenarios", [])
    failed = [s for s in scenarios if not s.get("passed", False)]
    lines = ["## Correctness (`npugraph-harness check`)", "",
             f"{'PASSED' if check.get('passed') else 'FAILED'}: {len(scenarios) - len(failed)} of {len(scenarios)} "
             "scenarios passed.", "",
             "| scenario | result | match | tie | mismatch | graph steps | eager steps |", "|---|---|---:|---:|---:|---:|---:|"]
    for s in scenarios:
        verdicts = s.get("verdicts", {})
        lines.append(f"| {s.get('name')} | {'pass' if s.get('passed') else '**FAIL**'} | {verdicts.get('match', 0)} | "
                     f"{verdicts.get('tie', 0)} | {verdicts.get('mismatch', 0)} | {s.get('graph_steps', '-')} | "
                     f"{s.get('eager_steps', '-')} |")
    lines.append("")
    lines += [f"- FAIL `{s.get('name')}`: {'; '.join(s.get('failures', [])) or 'see check.json'}" for s in failed]
    environment = {k: v for k, v in check.get("environment", {}).items() if k not in ("warnings", "skipped")}
    if environment:
        lines += ["", "Environment: " + ", ".join(f"{k} {v if v is not None else '-'}" for k, v in environment.items())]
    lines += [f"- **WARNING**: {w}" for w in check.get("environment", {}).get("warnings", [])]
    return lines + ([""] if failed or environment else [])


def _cost_section(cost_ratios: list[CostRatio]) -> list[str]:
    if not cost_ratios:
        return []
    lines = ["## Time to verdict", "", "Ratios of wall times measured in one run (`suites/bench/test_time_to_verdict.py`).",
             "", "| ratio | model | seconds | measured | required | met |", "|---|---|---|---:|---:|---|"]
    for c in cost_ratios:
        seconds = ", ".join(f"{side} {s:.1f}" for side, s in c.seconds.items())
        lines.append(f"| {c.ratio} | {c.model} | {seconds} | {c.measured:.2f}x | <= {c.limit:g}x | "
                     f"{'yes' if c.met else '**no**'} |")
    return [*lines, ""]


def _goals_section(results: list[BenchResult], device: str) -> list[str]:
    rows = [(t, t.measure(results)) for t in GOALS if device in t.devices]
    rows = [(t, value) for t, value in rows if value is not None]
    if not rows:
        return []
    lines = ["## Performance goals", "", "Reported, not gated. Against eager, the measured speed-up; against "
             "`hf`, the ratio of fastest rounds. `>= 0.77x` is replay within 1.3x of eager's time.", "",
             "| goal | model | kind | bs | measured | required | met |", "|---|---|---|---:|---:|---:|---|"]
    for t, value in rows:
        lines.append(f"| {t.what} | {t.model} | {t.kind} | {t.bs} | {value:.2f}x | >= {t.factor:.2f}x | "
                     f"{'yes' if value >= t.factor else '**no**'} |")
    return [*lines, ""]


def render_chart(results: list[BenchResult], baseline: list[BenchResult], path: Path) -> None:
    """Tokens/s per batch size and mode (log scale), one panel per model and kind; a black tick marks
    the baseline's tokens/s and the label above each bar its speed-up over eager."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.model for r in results))
    measured, base = speedups(results), {r.key: r for r in baseline}
    fig, axes = plt.subplots(len(models), len(KINDS), figsize=(6.5 * len(KINDS), 4.2 * len(models)), squeeze=False)
    for row, model in enumerate(models):
        for col, (kind, title) in enumerate(KINDS.items()):
            ax = axes[row][col]
            rows = [r for r in results if (r.model, r.kind) == (model, kind)]
            if not rows:
                ax.set_axis_off()
                continue
            sizes = sorted({r.bs for r in rows})
            modes = [m for m in BENCH_MODES if any(r.mode == m for r in rows)]
            width = 0.8 / max(len(modes), 1)
            for i, mode in enumerate(modes):
                for x, bs in enumerate(sizes):
                    r = next((r for r in rows if (r.mode, r.bs) == (mode, bs)), None)
                    if r is None:
                        continue
                    pos = x - 0.4 + width * (i + 0.5)
                    ax.bar(pos, r.tokens_per_s, width * 0.92, color=COLORS[mode], label=mode if x == 0 else None)
                    if r.key in base:
                        ax.hlines(base[r.key].tokens_per_s, pos - width / 2, pos + width / 2, colors="black",
                                  linewidth=2, label="baseline" if (i, x) == (0, 0) else None)
                    if r.key in measured:  # above the bar and its baseline tick, whichever is higher
                        top = max(r.tokens_per_s, base[r.key].tokens_per_s if r.key in base else 0)
                        ax.annotate(f"{measured[r.key]:.2f}x", (pos, top), xytext=(0, 3),
                                    textcoords="offset points", ha="center", fontsize=7.5, rotation=90)
            ax.set_yscale("log")
            ax.set_xticks(range(len(sizes)), [f"bs={bs}" for bs in sizes])
            ax.set_title(f"{model}: {title}")
            ax.set_ylabel("tokens/s (log)")
            ax.margins(y=0.25)
            ax.grid(axis="y", which="both", alpha=0.25)
            ax.legend(fontsize=8, loc="upper left")
    fig.suptitle("Decode throughput: bars at the median round, black ticks the stored baseline;\n"
                 "labels: speed-up over eager (fastest rounds, eager interleaved)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- precision drift: each check scenario's drift statistics against the figures stored for it ---------------

DRIFT_PLOTTED = ("mean_abs_diff", "mean_kl", "flip_rate")


def drift_rows(check: dict, stored: DriftBaseline | None) -> list[tuple[str, DriftStats, DriftStats | None]]:
    """Per check scenario with compared steps: its name, drift and the figure stored for it (None: none stored)."""
    rows = []
    for s in check.get("scenarios", []):
        if not s.get("drift", {}).get("steps"):
            continue
        record = stored.stored(Scenario.from_dict(s), check.get("device"), check.get("target"),
                               check.get("machine")) if stored else None
        rows.append((f"{s['name']} {s['dtype']}", DriftStats.from_dict(s["drift"]), record.drift if record else None))
    return rows


def drift_section(rows: list[tuple[str, DriftStats, DriftStats | None]], stored: DriftBaseline | None) -> list[str]:
    """The drift of each scenario, with its stored figure and the limit the figure sets (`check --drift-baseline`)."""
    if not rows:
        return []
    source = f"the figures stored in `{stored.path}`" if stored else "no stored figures (`check --drift-record`)"
    lines = ["## Precision drift", "",
             f"Over each scenario's compared steps, against {source}; *limit*: the most `check --drift-baseline` "
             "allows. Statistics: README, \"Drift statistics\".", "",
             "| scenario | steps | " + " | ".join(_cell(LABELS[n]) for n in DRIFT_PLOTTED) + " | top-1 agreement | grew |",
             "|---|---:|" + "---:|" * len(DRIFT_PLOTTED) + "---:|---|"]
    for name, drift, figure in rows:
        cells = [f"{drift.statistic(n):.3g}" + (f" (stored {figure.statistic(n):.3g}, limit "
                                                  f"{growth_limit(n, figure, drift.steps):.3g})" if figure else "")
                 for n in DRIFT_PLOTTED]
        grew = "-" if figure is None else ", ".join(
            _cell(LABELS[n]) for n in DRIFT_PLOTTED if drift.statistic(n) > growth_limit(n, figure, drift.steps)) or "no"
        lines.append(f"| {name} | {drift.steps} | {' | '.join(cells)} | {drift.top1_agreement:.1%} | {grew} |")
    return [*lines, ""]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a bar would end the table cell


def render_drift_chart(rows: list[tuple[str, DriftStats, DriftStats | None]], path: Path) -> None:
    """Per scenario, a bar per plotted statistic (log scale; red where it grew beyond the limit its stored figure
    sets), a black tick at the stored figure and a dashed one at the limit; exact drift (0) is written, not drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DRIFT_PLOTTED), figsize=(4 + 4 * len(DRIFT_PLOTTED), max(3.0, 1.2 + 0.3 * len(rows))),
                             squeeze=False, sharey=True, layout="constrained")
    for ax, statistic in zip(axes[0], DRIFT_PLOTTED):
        drawn = [d.statistic(statistic) for _, d, _ in rows] + [f.statistic(statistic) for *_, f in rows if f]
        floor = min([v for v in drawn if v > 0], default=1e-6) / 3
        for y, (_, drift, figure) in enumerate(rows):
            value, limit = drift.statistic(statistic), growth_limit(statistic, figure, drift.steps) if figure else None
            if value > 0:
                grew = limit is not None and value > limit
                ax.barh(y, value - floor, left=floor, color="#d62728" if grew else "#1f77b4")
            else:
                ax.text(floor, y, " 0 (exact)", va="center", fontsize=7)
            if figure is not None and figure.statistic(statistic) > 0:
                ax.vlines(figure.statistic(statistic), y - 0.4, y + 0.4, colors="black", linewidth=2)
                ax.vlines(limit, y - 0.4, y + 0.4, colors="black", linewidth=1, linestyles="dashed")
        ax.set_xscale("log")
        ax.set_title(LABELS[statistic], fontsize=9)
        ax.grid(axis="x", which="both", alpha=0.25)
    axes[0][0].set_yticks(range(len(rows)), [name for name, *_ in rows], fontsize=7)
    axes[0][0].invert_yaxis()
    fig.suptitle("Drift per scenario over its compared steps: black tick the stored figure, dashed the most "
                 f"--drift-baseline allows ({DRIFT_GROWTH:g}x); red bars grew beyond it", fontsize=10)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def default_drift_baseline(check: dict) -> Path | None:
    """`baselines/drift-<device>.json` for the device the check ran on, where it exists."""
    path = BASELINES / f"drift-{check.get('device', 'cpu')}.json"
    return path if path.is_file() else None


def load_check(path: Path) -> dict:
    """The document `npugraph-harness check --json` wrote: `passed` and a list of scenario objects."""
    check = json.loads(Path(path).read_text())
    if not (isinstance(check, dict) and isinstance(check.get("scenarios"), list)
            and all(isinstance(s, dict) for s in check["scenarios"])):
        raise ValueError("expected an object with a list of scenarios, as `check --json` writes")
    return check


def _load(path: Path, what: str, loader: Callable[[Path], Any]) -> Any:
    try:
        return loader(path)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise UsageError(f"{path}: not readable as {what} ({type(error).__name__}: {error})") from None


def report(args: argparse.Namespace) -> int:
    """Write `summary.md` and `bench.png`; exit 1 when the ratio gate or the check failed, or a time-to-verdict
    ratio was above its limit."""
    folder = args.results if args.results.is_dir() else args.results.parent
    bench_json = args.results / "bench.json" if args.results.is_dir() else args.results
    if not bench_json.is_file():
        raise UsageError(f"no benchmark results at {bench_json} (write them with `npugraph-harness bench --json {bench_json}`)")
    results, cost_ratios, machine_info = _load(bench_json, "pytest-benchmark results", load_results)
    if not results and not cost_ratios:
        raise UsageError(f"{bench_json} holds no suites/bench results")
    sources = {"results": str(bench_json)}
    baseline_file = args.baseline or stored_baseline(machine_info)
    baseline = _load(baseline_file, "pytest-benchmark results", load_results)[0] if baseline_file else []
    if baseline_file:
        sources["baseline"] = str(baseline_file)
    ratios_file = args.ratios or ratios_path(machine_info.get("npugraph", {}).get("device", "cpu"))
    name = machine_info.get("npugraph", {}).get("device_name", "?")
    stored = (_load(ratios_file, "stored speed-ups", lambda path: load_ratios(path, name)) if ratios_file.is_file()
              else None) or {}
    if stored:
        sources["stored speed-ups"] = str(ratios_file)
    check_file = args.check or folder / "check.json"
    check = _load(check_file, "check results", load_check) if check_file.is_file() else None
    if check is not None:
        sources["check"] = str(check_file)
    out = args.out or folder
    out.mkdir(parents=True, exist_ok=True)
    drift_file = (args.drift_baseline or default_drift_baseline(check)) if check is not None else None
    drift_stored = _load(drift_file, "a drift baseline", DriftBaseline.load) if drift_file else None
    if drift_file:
        sources["drift baseline"] = str(drift_file)
    drift = drift_rows(check, drift_stored) if check is not None else []
    (out / "summary.md").write_text(render_markdown(results, machine_info, baseline, stored, args.tolerance, check, sources,
                                                       cost_ratios) + "\n".join(drift_section(drift, drift_stored)))
    render_chart(results, baseline, out / "bench.png")
    written = [out / "summary.md", out / "bench.png"]
    if drift:
        render_drift_chart(drift, out / "drift.png")
        written.append(out / "drift.png")
    print(f"wrote {', '.join(map(str, written[:-1]))} and {written[-1]}")
    gate_ok = all(c.passed for c in ratio_gate(speedups(results), stored, args.tolerance))
    costs_ok = all(c.met for c in cost_ratios)
    return 0 if gate_ok and costs_ok and (check is None or check.get("passed")) else 1
