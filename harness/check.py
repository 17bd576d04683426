"""`npugraph-harness check`: judge the engine under test on a matrix of scenarios, print the table,
write the reports; exit 0 only if every scenario passed.

Everything is resolved and validated before the first scenario runs (`plan_check`), so that a bad input
costs one line and exit 2 at once, never a run thrown away: first the options alone, before torch is
imported (`OPTION_CHECKS`); then the device and the target, and per model its checkpoint (a builtin
built, a directory validated tensor by tensor unless it passed unchanged since) and its requests (`MODEL_CHECKS`: context, top-k,
layout, KV-cache memory). A new check is one function added to either tuple.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from harness.exits import EXIT_FAIL, EXIT_PASS, UsageError, stop_reason
from harness.inputs.builtin_models import names_a_checkpoint, not_a_model
from harness.inputs.scenarios import Scenario, default_matrix
from harness.inputs.workloads import WORKLOADS, make_requests
from harness.stops import raise_if_stopped
from harness.targets import ENTRY_POINT_GROUP, find_target, target_names
from reference_runner.device import DEVICES
from reference_runner.engine.args import MODES, EngineArgs
from reference_runner.records import Request

if TYPE_CHECKING:
    import torch

    from harness.judge import Judge, ScenarioResult
    from harness.report import CheckResult
    from harness.targets.base import Target
    from harness.verdicts.drift_baseline import DriftBaseline
    from reference_runner.models.config import ModelConfig

# Decode graphs are captured at [1, 2, 4, 8] and every 8 up to --max-bs: beyond this, capture alone takes ages.
MAX_BS = 1024
OUTPUTS = ("json", "junit", "drift_record")  # the report options, each a file path


@dataclass(frozen=True)
class ModelPlan:
    """One model of the check: as named on the command line, its validated checkpoint and config, its requests."""

    name: str
    checkpoint: Path
    config: ModelConfig
    workload: str
    requests: list[Request]
    fingerprint: str  # changes when the checkpoint does (`checkpoints.fingerprint`)


@dataclass(frozen=True)
class CheckPlan:
    """Everything a check runs, resolved and validated before its first scenario."""

    device: str
    target: Target
    engine: EngineArgs  # every mode's options; each scenario sets its own mode
    modes: list[str]
    workload: str
    max_new_tokens: int
    models: list[ModelPlan]
    min_coverage: float
    json: Path | None = None
    junit: Path | None = None
    against: list[Target] = dataclasses.field(default_factory=list)  # targets whose eager runs are baselines
    drift_record: Path | None = None
    drift_baseline: DriftBaseline | None = None  # --drift-baseline: the stored figures each scenario is judged against
    resumed: dict[str, ScenarioResult] = dataclasses.field(default_factory=dict)  # by name: finished, from --resume

    @property
    def scenarios(self) -> list[Scenario]:
        return default_matrix([m.name for m in self.models], self.modes, self.engine, [t.name for t in self.against],
                              self.target.twins(self.engine), workload=self.workload,
                              max_new_tokens=self.max_new_tokens)

    @property
    def identity(self) -> dict:
        """What decides every verdict besides each scenario's own fields and checkpoint: a resumed scenario must
        share it."""
        return {"device": self.device, "target": self.target.name, "min_coverage": self.min_coverage,
                "drift_baseline": str(self.drift_baseline.path) if self.drift_baseline else None}


def check(args: argparse.Namespace) -> int:
    """The command: plan, run every scenario (the reports rewritten as each ends), print the table, also of a run
    stopped early; EXIT_PASS only if every scenario passed."""
    plan = plan_check(args)
    result = new_result(plan)
    try:
        run_check(plan, result, progress=stderr_progress)
    finally:
        if result.scenarios:
            print(result.summary())
    return EXIT_PASS if result.passed else EXIT_FAIL


def stderr_progress(line: str) -> None:
    """A progress line on stderr, time-stamped."""
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr)


def new_result(plan: CheckPlan) -> CheckResult:
    """The result of `plan` before any scenario has run."""
    from harness.report import CheckResult

    return CheckResult([], plan.scenarios, meta=dict(plan.identity),
                       fingerprints={m.name: m.fingerprint for m in plan.models})


def run_check(plan: CheckPlan, result: CheckResult, progress: Callable[[str], None]) -> None:
    """Run `plan`'s scenarios into `result`, a resumed one taken as it was, writing the reports before the first
    and after each. However the run ends, what finished is kept, and the reports say why the rest did not run."""
    from harness.environment import ascend_environment
    from harness.judge import SETUP_ERRORS, Judge
    from harness.report import CheckReports
    from harness.verdicts.drift_baseline import this_machine

    judge = Judge(plan.target, progress=progress, min_coverage=plan.min_coverage, against=plan.against,
                  drift_baseline=plan.drift_baseline)
    scenarios = plan.scenarios
    progress(f"validated {', '.join(m.name for m in plan.models)} on {plan.device}: {len(scenarios)} scenario(s)"
             + (f", {len(plan.resumed)} finished before" if plan.resumed else ""))
    result.meta["machine"] = machine = this_machine(plan.device)
    if plan.drift_baseline is not None:
        stored = [plan.drift_baseline.stored(s, plan.device, plan.target.name, machine) for s in scenarios]
        progress(f"--drift-baseline {plan.drift_baseline.path}: figures stored for {len(stored) - stored.count(None)} "
                 f"of {len(scenarios)} scenario(s) on {plan.target.name}, {plan.device}, {machine}")
    result.meta["environment"] = environment = ascend_environment(plan.device)
    for warning in environment.get("warnings", []):
        print(f"npugraph-harness: warning: {warning}", file=sys.stderr)
    reports = CheckReports(plan.json, plan.junit, plan.drift_record)
    plan.target.warm_up([s.mode for s in scenarios if s.name not in plan.resumed])
    try:
        try:
            reports.write(result)
            for i, scenario in enumerate(scenarios, 1):
                raise_if_stopped()
                if scenario.name in plan.resumed:
                    progress(f"scenario {i}/{len(scenarios)}: {scenario.name}: finished before, not run again")
                    result.scenarios.append(plan.resumed[scenario.name])
                else:
                    progress(f"scenario {i}/{len(scenarios)}: {scenario.name}")
                    result.scenarios.append(run_scenario(judge, scenario))
                result.pending = scenarios[i:]
                reports.write(result)
        except (OSError, *SETUP_ERRORS) as error:
            raise UsageError(str(error)) from None
    except BaseException as error:
        result.stopped_by = stop_reason(error)
        with contextlib.suppress(OSError):
            reports.write(result)
        raise
    finally:
        judge.close()


def run_scenario(judge: Judge, scenario: Scenario) -> ScenarioResult:
    """The judge's result, or, where the harness itself raised, the scenario failed with that error: the run goes on.
    A setup error (a checkpoint, a device) raises: every later scenario would meet it too."""
    from harness.judge import SETUP_ERRORS, ScenarioResult

    start = time.perf_counter()
    try:
        return judge.run(scenario)
    except SETUP_ERRORS:
        raise
    except Exception as error:
        judge.progress(f"{scenario.name}: internal error, the scenario fails and the run goes on:\n"
                       + traceback.format_exc().rstrip())
        return ScenarioResult.raised(scenario, error, time.perf_counter() - start)


def plan_check(args: argparse.Namespace) -> CheckPlan:
    """Resolve and validate everything `args` asks for, or raise UsageError naming the culprit."""
    for option_check in OPTION_CHECKS:
        option_check(args)
    import torch

    from harness.targets import get_target
    from harness.targets.base import MIN_COVERAGE, TargetUnavailable
    from reference_runner.attention import default_dtype
    from reference_runner.device import DeviceUnavailable, detect_device, resolve_device

    quiet_progress_bars()
    try:
        device = resolve_device(args.device) if args.device else detect_device()
        target = get_target(args.target, device)
        against = [get_target(name, device) for name in args.against or ()]
    except (DeviceUnavailable, TargetUnavailable) as error:
        raise UsageError(str(error)) from None
    engine = EngineArgs.from_cli_args(args, dtype=args.dtype or default_dtype(device))
    min_coverage = MIN_COVERAGE if args.min_coverage is None else args.min_coverage
    plan = CheckPlan(device, target, engine, list(args.modes), args.workload, args.max_new_tokens, models=[],
                     min_coverage=min_coverage, against=against, **{output: getattr(args, output) for output in OUTPUTS},
                     drift_baseline=read_drift_baseline("--drift-baseline", args.drift_baseline))
    for name in args.model:  # all of them before any scenario: a bad last model costs nothing
        model = resolve_model(name, args.workload, args.max_new_tokens, getattr(torch, engine.dtype))
        for model_check in MODEL_CHECKS:
            model_check(plan, model)
        plan.models.append(model)
    if not plan.scenarios:
        raise UsageError("no scenario to run: give at least one --model and one of --modes")
    if args.resume:
        plan.resumed.update(resumable(plan, args.resume))
    return plan


def quiet_progress_bars() -> None:
    """No progress bars from transformers (checkpoint builds, the oracle's loads): the check prints its own lines.
    Said through the environment, which huggingface_hub reads when imported: a run that needs no transformers
    never imports it."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].logging.disable_progress_bar()


def resumable(plan: CheckPlan, file: Path) -> dict[str, ScenarioResult]:
    """The scenarios of `plan` that check report `file` holds as finished with the same options, target, device and
    checkpoint, by name; a file that is no check report raises UsageError."""
    from harness.judge import ScenarioResult

    try:
        doc = json.loads(file.read_text())
        records = {record["name"]: record for record in doc["scenarios"]}
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as error:
        raise UsageError(f"--resume {file}: not a check report written by --json ({type(error).__name__}: "
                         f"{error})") from None
    if any(doc.get(key) != value for key, value in plan.identity.items()):
        return {}
    fingerprints = {m.name: m.fingerprint for m in plan.models}
    finished = {}
    for scenario in plan.scenarios:
        record = records.get(scenario.name)
        if record is None or record.get("checkpoint_fingerprint") != fingerprints[scenario.model]:
            continue
        try:
            result = ScenarioResult.from_dict(record)
        except (KeyError, TypeError, ValueError) as error:
            raise UsageError(f"--resume {file}: scenario {scenario.name!r} cannot be read back ({type(error).__name__}: "
                             f"{error}); was it written by an older npugraph-harness?") from None
        if result.scenario == scenario:
            finished[scenario.name] = result
    return finished


def resolve_model(name: str, workload: str, max_new_tokens: int, dtype: torch.dtype) -> ModelPlan:
    """Model `name`'s checkpoint (built, or validated tensor by tensor for a run in `dtype` unless it passed that
    unchanged since: `harness/inputs/validation.py`) and its requests."""
    from harness.inputs.checkpoints import default_cache_dir, ensure_checkpoint, fingerprint
    from harness.inputs.validation import validated_config
    from reference_runner.errors import CheckpointError, UnsupportedModel

    try:
        checkpoint = ensure_checkpoint(name)
        config = validated_config(checkpoint, dtype, default_cache_dir())
    except (CheckpointError, UnsupportedModel) as error:
        raise UsageError(f"--model {name}: {error}") from None
    requests = make_requests(workload, config.vocab_size, max_new_tokens)
    if not requests:
        raise UsageError(f"--workload {workload} has no request for model {name!r}: the check would compare nothing")
    return ModelPlan(name, checkpoint, config, workload, requests, fingerprint(checkpoint))


# --- option checks: the parsed options alone, before torch is imported ---------------------------

def check_lists(args: argparse.Namespace) -> None:
    """Known modes; no item twice (the parser already refused empty items)."""
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        raise UsageError(f"--modes: unknown mode {unknown[0]!r}; choose from {', '.join(MODES)}")
    for option, items in (("--modes", args.modes), ("--model", args.model), ("--graph-bs", args.graph_bs or ()),
                          ("--against", args.against or ())):
        twice = [item for i, item in enumerate(items) if item in items[:i]]
        if twice:
            raise UsageError(f"{option} lists {twice[0]!r} twice")


def check_numbers(args: argparse.Namespace) -> None:
    """Every count at least 1, --max-bs at most MAX_BS, --graph-bs within 1..--max-bs, and --num-blocks
    enough for one request of --max-context."""
    numbers = {"--max-new-tokens": args.max_new_tokens}
    numbers |= {EngineArgs.flag(f.name): getattr(args, f.name) for f in dataclasses.fields(EngineArgs)
                if f.type in ("int", "int | None")}  # counts; graph_bs and the timeout are checked below
    for flag, value in numbers.items():
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    if args.min_coverage is not None and not 0 <= args.min_coverage <= 1:
        raise UsageError(f"--min-coverage must lie in 0..1, got {args.min_coverage:g}")
    try:
        engine = EngineArgs.from_cli_args(args)
    except ValueError as error:  # a value no engine takes, e.g. --replay-timeout 0
        raise UsageError(str(error)) from None
    if engine.max_bs > MAX_BS:
        raise UsageError(f"--max-bs {engine.max_bs} is above {MAX_BS}: that many captured batch sizes would take "
                         f"ages to capture")
    if engine.graph_bs and not all(1 <= bs <= engine.max_bs for bs in engine.graph_bs):
        raise UsageError(f"--graph-bs {list(engine.graph_bs)} must lie in 1..--max-bs ({engine.max_bs})")
    if engine.kv_num_blocks() < engine.blocks_per_seq + 1:
        raise UsageError(f"--num-blocks {engine.num_blocks} cannot hold one request of --max-context {engine.max_context}: "
                         f"that takes {engine.blocks_per_seq} blocks of {engine.block_size} tokens, plus block 0 (reserved)")


def check_names(args: argparse.Namespace) -> None:
    """A known device (also in NPUGRAPH_DEVICE), target and workload; each model a builtin or real model's name or a
    directory (what it holds is checked once torch is imported)."""
    forced = os.environ.get("NPUGRAPH_DEVICE") or None  # empty means unset
    for where, device in (("--device ", args.device), ("NPUGRAPH_DEVICE=", forced)):
        if device is not None and device not in DEVICES:
            raise UsageError(f"{where}{device}: unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    for option, target in (("--target", args.target), *(("--against", name) for name in args.against or ())):
        if find_target(target) is None:
            raise UsageError(f"{option} {target}: unknown target {target!r}; choose one of {', '.join(target_names())} "
                             f"(or register one under the entry-point group {ENTRY_POINT_GROUP})")
    if args.target in (args.against or ()):
        raise UsageError(f"--against {args.target}: the target under test itself; name other targets to judge it "
                         "against (without --against, its modes are judged against its own eager run)")
    if args.workload not in WORKLOADS:
        raise UsageError(f"--workload {args.workload}: unknown workload {args.workload!r}; choose one of "
                         f"{', '.join(WORKLOADS)}")
    for name in args.model:
        if not names_a_checkpoint(name):
            raise UsageError(f"--model {name}: {not_a_model(name)}")


def check_outputs(args: argparse.Namespace) -> None:
    """Each report path is a file we can write (its folders are made now), and no two options share one."""
    paths = {option.replace("_", "-"): getattr(args, option) for option in OUTPUTS if getattr(args, option) is not None}
    seen: dict[Path, str] = {}
    for option, path in paths.items():
        if path.resolve() in seen:
            raise UsageError(f"--{seen[path.resolve()]} and --{option} both write {path}")
        seen[path.resolve()] = option
        if path.is_dir():
            raise UsageError(f"--{option} {path}: is a directory, not a file")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=path.parent):  # the folder takes a new file
                pass
            if path.exists() and not os.access(path, os.W_OK):
                raise PermissionError(f"{path} is read-only")
        except OSError as error:
            raise UsageError(f"--{option} {path}: cannot write there ({error})") from None


def check_resume(args: argparse.Namespace) -> None:
    """--resume names a file (what it holds is read once the plan is made)."""
    if args.resume is not None and not args.resume.is_file():
        raise UsageError(f"--resume {args.resume}: no such file (give the --json report of the run to resume)")


def check_reference_only(args: argparse.Namespace) -> None:
    """Prefill graphs and graph trees are modes of the reference runner: another target would run without them and
    pass having checked none of it."""
    if args.target == "reference":
        return
    if args.prefill_graphs:
        raise UsageError(f"--prefill-graphs: the {args.target} target cannot be told to capture prefill graphs, nor "
                         "report their steps; it is an option of the reference target")
    if "tree" in args.modes:
        raise UsageError(f"--modes tree: the {args.target} target has no graph-tree mode; it is a mode of the reference "
                         "target")


def check_drift_files(args: argparse.Namespace) -> None:
    """--drift-baseline names a drift baseline file; --drift-record, where it exists, is one (its figures are kept)."""
    if args.drift_baseline is not None and not args.drift_baseline.is_file():
        raise UsageError(f"--drift-baseline {args.drift_baseline}: no such file (record one with --drift-record)")
    for option in ("--drift-baseline", "--drift-record"):
        read_drift_baseline(option, getattr(args, option[2:].replace("-", "_")))


def read_drift_baseline(option: str, path: Path | None) -> DriftBaseline | None:
    """The drift figures stored in `path` (none where it does not exist yet), or UsageError naming `option`."""
    from harness.verdicts.drift_baseline import DriftBaseline

    if path is None:
        return None
    try:
        return DriftBaseline.load(path)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        raise UsageError(f"{option} {path}: not a drift baseline written by --drift-record ({type(error).__name__}: "
                         f"{error})") from None


OPTION_CHECKS: tuple[Callable[[argparse.Namespace], None], ...] = (
    check_names, check_lists, check_numbers, check_outputs, check_resume, check_reference_only, check_drift_files)


# --- model checks: each model's config and requests against the engine's limits -----------------

def check_context(plan: CheckPlan, model: ModelPlan) -> None:
    """--max-context within the model's positions, and every request within --max-context."""
    engine, positions = plan.engine, model.config.max_position_embeddings
    if engine.max_context > positions:
        raise UsageError(f"--max-context {engine.max_context} exceeds model {model.name!r}'s max_position_embeddings "
                         f"{positions}")
    for r in model.requests:
        if len(r.prompt_ids) + r.max_new_tokens > engine.max_context:
            raise UsageError(f"--max-new-tokens {plan.max_new_tokens}: request {r.rid!r} of workload {model.workload!r} "
                             f"needs {len(r.prompt_ids)} prompt + {r.max_new_tokens} new tokens, beyond --max-context "
                             f"{engine.max_context}")


def check_decode_steps(plan: CheckPlan, model: ModelPlan) -> None:
    """A graph mode has a decode step to replay: some request wants a token after the one its prefill gives."""
    graph_modes = [mode for mode in plan.modes if mode != "eager"]
    if graph_modes and all(r.max_new_tokens < 2 for r in model.requests):
        raise UsageError(f"--max-new-tokens {plan.max_new_tokens}: no request of workload {model.workload!r} decodes after "
                         f"its prefill (which gives the first token), so mode {graph_modes[0]!r} would replay nothing: "
                         "give 2 or more")


def check_top_k(plan: CheckPlan, model: ModelPlan) -> None:
    """--top-k within the vocabulary."""
    if plan.engine.top_k > model.config.vocab_size:
        raise UsageError(f"--top-k {plan.engine.top_k} exceeds model {model.name!r}'s vocab_size {model.config.vocab_size}")


def check_layout(plan: CheckPlan, model: ModelPlan) -> None:
    """A multi-rank layout of the reference target fits the model and the ranks available."""
    if plan.engine.world_size == 1 or plan.target.name != "reference":
        return
    from harness.targets.launch import RankJob, validate_layout
    from reference_runner.errors import LayoutError

    try:
        validate_layout(RankJob(str(model.checkpoint), model.requests, plan.engine, device=plan.device))
    except LayoutError as error:
        raise UsageError(f"--model {model.name}: {error}") from None


def check_target(plan: CheckPlan, model: ModelPlan) -> None:
    """The target can run the model in every mode asked for, and each target judged against can run its eager baseline
    (a third-party engine refuses what it lacks); and each can be compared past a near-tie, or a scenario would stop
    at the first one."""
    from harness.targets.base import FORCINGS, TargetUnavailable

    for option, target in (("--target", plan.target), *(("--against", t) for t in plan.against)):
        if getattr(target, "forcing", None) not in FORCINGS:
            raise UsageError(f"{option} {target.name}: it can neither force tokens in its loop nor be continued "
                             f"(forcing={getattr(target, 'forcing', None)!r}, not one of {', '.join(FORCINGS)}), so its "
                             f"scenarios would stop comparing at their first near-tie, below the minimum coverage")

    base = Scenario(model.name, baseline="eager", engine=plan.engine)
    runs = [(plan.target, dataclasses.replace(base, engine=dataclasses.replace(plan.engine, mode=mode)))
            for mode in plan.modes]
    runs += [(against, dataclasses.replace(base, engine=base.baseline_engine())) for against in plan.against]
    for target, scenario in runs:
        try:
            target.validate(scenario, model.checkpoint)
        except TargetUnavailable as error:
            raise UsageError(f"--model {model.name}: {error}") from None


def check_memory(plan: CheckPlan, model: ModelPlan) -> None:
    """The KV cache fits the memory available: the one-rank eager baseline's, and every rank's (ranks on the CPU
    share its memory; on an accelerator each has its own)."""
    from reference_runner.parallel.state import kv_heads_per_rank

    engine, config = plan.engine, model.config
    blocks, itemsize = engine.kv_num_blocks(), _itemsize(engine.dtype)
    available, source = available_memory(plan.device)
    # (tp size, ranks sharing the memory): the eager baseline on one rank, then the layout under test.
    for tp, ranks in ((1, 1), (engine.tp_size, engine.world_size if plan.device == "cpu" else 1)):
        kv_heads = kv_heads_per_rank(config.num_key_value_heads, tp)
        need = blocks * engine.block_size * config.num_hidden_layers * kv_heads * config.head_dim * 2 * itemsize * ranks
        if need > available:
            raise UsageError(
                f"the KV cache of model {model.name!r} needs {need / 2**20:,.0f} MiB ({blocks:,} blocks x "
                f"{engine.block_size} tokens x {config.num_hidden_layers} layers x {kv_heads} KV heads x "
                f"{config.head_dim} x 2 (K, V) x {itemsize} bytes{f' x {ranks} ranks' if ranks > 1 else ''}), but "
                f"{available / 2**20:,.0f} MiB are available ({source}): lower --max-bs, --num-blocks or --max-context")


def check_device_modes(plan: CheckPlan, model: ModelPlan) -> None:
    """Modes tree and compile_nograph where the device runs them: no graph trees on the CPU, nor on npu without a
    torch_npu whose trees update FIA's host list; no compiled step without graphs on npu."""
    from reference_runner.errors import ModeUnsupported
    from reference_runner.graphs import get_graph_backend

    for mode in ("tree", "compile_nograph"):
        if mode not in plan.modes:
            continue
        try:
            get_graph_backend(plan.device, mode)
        except ModeUnsupported as error:
            raise UsageError(f"--modes {mode}: {error}") from None


MODEL_CHECKS: tuple[Callable[[CheckPlan, ModelPlan], None], ...] = (
    check_context, check_decode_steps, check_top_k, check_layout, check_target, check_memory,
    check_device_modes)


def available_memory(device: str) -> tuple[int, str]:
    """Bytes free for a new allocation on `device` (the first accelerator), and where the figure comes from."""
    if device != "cpu":
        import torch

        return getattr(torch, device).mem_get_info()[0], f"torch.{device}.mem_get_info"
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024, "MemAvailable in /proc/meminfo"
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free physical pages"


def _itemsize(dtype: str) -> int:
    import torch

    return getattr(torch, dtype).itemsize
