"""SGLang as a target: `sglang.Engine` on the same checkpoint and token ids, in a worker process.

Devices and modes:
- cpu: SGLang's own CPU engine (`SGLANG_USE_CPU_ENGINE=1`), `eager` only, with torch-native attention. Its worker
  gets the stand-ins for the two parts of it that PyPI lacks (`sglang_cpu/`). Its graph runner (`CPUGraphRunner`,
  torch.compile) needs the Intel AMX attention backend, which needs sgl_kernel's CPU build: modes graph and compile
  are refused there, as are MoE models whose SGLang code runs a triton kernel (`CPU_UNSUPPORTED`).
- cuda, npu: every mode; on npu the FIA decode path (below).

The judge runs it as it runs the reference runner: once with graphs disabled (`eager`, the
baseline) and once in the mode under test, greedy with top-k logprobs, then compares the records
with the same verdict rules. Public `sglang` API only: `Engine(...)`, `generate(...)`, `shutdown()`.
The engine runs in a worker process (`worker.py`) under a timeout; its scheduler processes share the
worker's process group, which is killed whole when the run ends.

Arguments are built from the installed SGLang's own `ServerArgs` fields: each option by its current name
(sglang 0.5.23: `cuda_graph_backend_decode`, `cuda_graph_max_bs_decode`, ...), else by the name an older
release used (`disable_cuda_graph`, `cuda_graph_max_bs`, ...). Prefill graphs are disabled in every mode:
the decode step is what is judged, and a prefill graph would make `eager` not eager. On npu the FIA
decode path is selected (`attention_backend="ascend"`, `ASCEND_USE_FIA=1`), whose host-list update is
what graph mode must get right.

Two things SGLang does not let us reproduce or observe, and what this target does about them:
- Arrival steps: SGLang schedules requests itself. All requests are submitted in one `generate`
  call and `arrival_step` is ignored; verdicts are per request, so only batch-dependent rounding
  can differ from a staggered run.
- Which decode steps replayed a graph: SGLang reports no per-step flag. Steps after the first (the
  prefill token) are flagged as graph steps when graphs were enabled, and the run is marked
  `counts_graph_steps=False`, so the judge does not fail it for a graph-step count it cannot know.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import typing
from collections.abc import Collection
from pathlib import Path
from typing import Any

from harness.inputs.scenarios import Scenario
from harness.targets.base import Target, TargetRun, TargetUnavailable
from harness.targets.sglang_cpu import STARTUP_DIR
from harness.targets.worker import WORKER_TIMEOUT_S, RunRequests, WorkerJob, WorkerSessions, sessions_capacity
from reference_runner.engine.args import EngineArgs
from reference_runner.records import Generation, Request

WORKER_ENV = {"cpu": {"SGLANG_USE_CPU_ENGINE": "1"}, "npu": {"ASCEND_USE_FIA": "1"}, "cuda": {}}  # per device it runs on
MODES = {"cpu": ("eager",), "cuda": ("eager", "graph", "compile"), "npu": ("eager", "graph", "compile")}
CPU_NO_GRAPHS = ("SGLang's CPU graph runner (torch.compile) needs its Intel AMX attention backend, which needs "
                 "sgl_kernel's CPU build (not on PyPI) and an AMX CPU; with torch-native attention it fails")
# Architectures that SGLang's CPU engine cannot run with torch-native attention and without sgl_kernel's CPU build, and
# the piece that is missing (sglang 0.5.23).
CPU_UNSUPPORTED = {
    "Qwen2MoeForCausalLM": "its shared-expert gate is a triton kernel (fused_gate_sigmoid_mul_add, "
                           "srt/models/qwen2_moe.py:877), and triton has no CPU driver",
}


def server_args_fields() -> dict[str, tuple | None]:
    """The installed SGLang's `ServerArgs` fields, each with the values it allows (None: not declared).
    A msgspec Struct from sglang 0.5.2x on, a dataclass before (whose choices live in its argparse code)."""
    from sglang.srt.server_args import ServerArgs

    if dataclasses.is_dataclass(ServerArgs):
        return {f.name: None for f in dataclasses.fields(ServerArgs)}
    import msgspec

    return {f.name: _choices(f.type) for f in msgspec.structs.fields(ServerArgs)}


def _choices(annotation: Any) -> tuple | None:
    # Annotated[T, Arg(choices=...)] or Annotated[T, "help"], where T may be Optional[Literal[...]].
    if typing.get_origin(annotation) is typing.Annotated:
        base, *meta = typing.get_args(annotation)
        declared = [tuple(m.choices) for m in meta if getattr(m, "choices", None)]
        return declared[0] if declared else _choices(base)
    for arg in typing.get_args(annotation) or (annotation,):
        if typing.get_origin(arg) is typing.Literal:
            return typing.get_args(arg)
    return None


def argument_problems(args: dict[str, Any], fields: dict[str, tuple | None]) -> list[str]:
    """Each argument that is not a field of `ServerArgs` or has a value outside the field's choices."""
    problems = [f"{name} is not a ServerArgs field" for name in args if name not in fields]
    return problems + [f"{name}={value!r} is not one of {fields[name]}" for name, value in args.items()
                       if fields.get(name) is not None and value not in fields[name]]


def _named(fields: Collection[str], *names_and_values: tuple[str, Any], required: bool = True) -> dict[str, Any]:
    """The first (name, value) whose name `fields` has: an option by its current name, then by older names."""
    for name, value in names_and_values:
        if name in fields:
            return {name: value}
    if required:
        raise TargetUnavailable("the installed SGLang's ServerArgs has none of "
                                f"{', '.join(name for name, _ in names_and_values)}")
    return {}  # an option older releases did not have


def engine_args(engine: EngineArgs, checkpoint: str, device: str, seed: int, fields: Collection[str]) -> dict[str, Any]:
    """Keyword arguments of `sglang.Engine` for `engine` (its mode above all), named as `fields` (ServerArgs) has them."""
    graphs = engine.mode != "eager"
    args = {
        "model_path": checkpoint,
        "device": device,
        "dtype": engine.dtype,
        "tp_size": engine.tp_size,
        "dp_size": engine.dp_size,
        "skip_tokenizer_init": True,  # token ids in and out; the built-in checkpoints have no tokenizer
        "disable_radix_cache": True,  # every prompt computed in full, as by the reference runner
        "random_seed": seed,
        "log_level": "error",
        "enable_torch_compile": engine.mode == "compile",
        **_named(fields, ("cuda_graph_backend_decode", "full" if graphs else "disabled"), ("disable_cuda_graph", not graphs)),
        **_named(fields, ("cuda_graph_backend_prefill", "disabled"), ("disable_piecewise_cuda_graph", True),
                 ("enable_piecewise_cuda_graph", False), required=False),
        **_named(fields, ("cuda_graph_max_bs_decode", engine.max_bs), ("cuda_graph_max_bs", engine.max_bs)),
        # The checkpoint's generation_config.json (a repetition penalty...) must not change greedy decoding.
        **_named(fields, ("sampling_defaults", "openai"), required=False),
        # KV-cache room for as many tokens as the reference runner holds, rather than a share of the device's memory.
        "max_total_tokens": engine.kv_num_blocks() * engine.block_size,
    }
    if engine.graph_bs:
        args |= _named(fields, ("cuda_graph_bs_decode", list(engine.graph_bs)), ("cuda_graph_bs", list(engine.graph_bs)))
    if device == "npu":
        args["attention_backend"] = "ascend"  # with ASCEND_USE_FIA=1 in the worker: the FIA decode path
    if device == "cpu":
        args["attention_backend"] = "torch_native"  # the one that needs no sgl_kernel op
    return args


def worker_env(device: str) -> dict[str, str]:
    """The variables SGLang's worker on `device` gets; on the CPU, the stand-ins' startup first on its path."""
    if device != "cpu":
        return WORKER_ENV[device]
    return {**WORKER_ENV["cpu"], "PYTHONPATH": os.pathsep.join([str(STARTUP_DIR), *sys.path])}


def check_supported(device: str, scenario: Scenario, checkpoint: Path) -> None:
    """Raise TargetUnavailable, in one line, if SGLang cannot run `scenario` on `checkpoint` on `device`."""
    if scenario.mode not in MODES[device]:
        why = f": {CPU_NO_GRAPHS}" if device == "cpu" else ""
        raise TargetUnavailable(f"target 'sglang' has no {scenario.mode} mode on {device}{why}; choose from "
                                f"{', '.join(MODES[device])}")
    if device != "cpu":
        return
    if scenario.engine.world_size > 1:
        raise TargetUnavailable("target 'sglang' runs one rank on cpu (SGLang's CPU engine wants a NUMA node, or "
                                "cores bound with SGLANG_CPU_OMP_THREADS_BIND, per rank): drop --tp and --dp")
    architecture = (json.loads((checkpoint / "config.json").read_text()).get("architectures") or ["(none)"])[0]
    if architecture in CPU_UNSUPPORTED:
        raise TargetUnavailable(f"target 'sglang' cannot run {checkpoint.name} ({architecture}) on cpu: "
                                f"{CPU_UNSUPPORTED[architecture]}")


def sampling_params(requests: list[Request]) -> list[dict]:
    """Greedy, exactly `max_new_tokens` per request (EOS ignored, as by the reference runner)."""
    return [{"temperature": 0, "max_new_tokens": r.max_new_tokens, "ignore_eos": True} for r in requests]


def generate_args(requests: list[Request], top_k: int) -> dict[str, Any]:
    """Keyword arguments of `Engine.generate` for every request in one call: token ids in, top-k logprobs out."""
    return {"input_ids": [r.prompt_ids for r in requests], "sampling_params": sampling_params(requests),
            "return_logprob": True, "top_logprobs_num": top_k}


def to_generation(request: Request, output: dict, mode: str) -> Generation:
    """The record of one `generate` output: `meta_info` holds `output_token_logprobs` as
    `(logprob, token_id, text)` per step and `output_top_logprobs` as a list of those per step."""
    meta = output["meta_info"]
    gen = Generation(request.rid)
    for step, (chosen, top) in enumerate(zip(meta["output_token_logprobs"], meta["output_top_logprobs"])):
        gen.append(chosen[1], [(token, logprob) for logprob, token, _ in top], mode != "eager" and step > 0)
    return gen


def start_engine(job: WorkerJob) -> RunRequests:
    """The worker's engine: `sglang.Engine` built once; each run generates every request in one call."""
    import sglang

    fields = server_args_fields()
    args = engine_args(job.engine, job.checkpoint, job.device, job.seed, fields)
    problems = argument_problems(args, fields)
    if problems:  # values are checked only once the engine launches its processes: say it here, plainly
        raise ValueError(f"sglang {sglang.__version__} rejects the adapter's arguments: {'; '.join(problems)}")
    engine = sglang.Engine(**args)

    def run(requests: list[Request]) -> TargetRun:
        outputs = engine.generate(**generate_args(requests, job.engine.top_k))
        generations = [to_generation(r, out, job.engine.mode) for r, out in zip(requests, outputs)]
        return TargetRun(generations, counts_graph_steps=False, engine_version=f"sglang {sglang.__version__}")

    # The worker's end ends the engine: its scheduler and detokenizer share the worker's process group.
    return run


class SGLangTarget(Target):
    name = "sglang"
    # Its logprobs are taken after its custom logit processors (srt/layers/sampler.py: _preprocess_logits, then
    # log_softmax), so forcing a token through one would falsify them: it is continued instead.
    forcing = "continuation"

    def __init__(self, device: str, setup: str | None = None, timeout_s: float = WORKER_TIMEOUT_S) -> None:
        if importlib.util.find_spec("sglang") is None:
            raise TargetUnavailable("target 'sglang' needs SGLang installed: on a CPU host sglang without its "
                                    "dependencies, then packaging/sglang-cpu.txt; on cuda pip install .[sglang]; on "
                                    "Ascend, SGLang's NPU build (README, \"Judging your engine\")")
        self.device = device
        self.setup = setup  # WorkerJob.setup: fault injection in the worker
        self.workers = WorkerSessions(worker_env(device), timeout_s, sessions_capacity(device))

    def validate(self, scenario: Scenario, checkpoint: Path) -> None:
        check_supported(self.device, scenario, checkpoint)

    def run(self, scenario: Scenario, checkpoint: Path, requests: list[Request]) -> TargetRun:
        job = WorkerJob(f"{__name__}:start_engine", str(checkpoint), scenario.engine, self.device, scenario.seed,
                        self.setup)
        return self.workers.run(job, requests)

    def close(self) -> None:
        self.workers.close()
