"""SGLang as a target: `sglang.Engine` on the same checkpoint and token ids, graphs disabled or on.

The judge runs it as it runs the reference runner: once with graphs disabled (`eager`, the
baseline) and once in the mode under test, greedy with top-k logprobs, then compares the records
with the same verdict rules. Public `sglang` API only: `Engine(...)`, `generate(...)`, `shutdown()`.

Two things SGLang does not let us reproduce or observe, and what this target does about them:
- Arrival steps: SGLang schedules requests itself. All requests are submitted in one `generate`
  call and `arrival_step` is ignored; verdicts are per request, so only batch-dependent rounding
  can differ from a staggered run.
- Which decode steps replayed a graph: SGLang reports no per-step flag. Steps after the first (the
  prefill token) are flagged as graph steps when graphs were enabled, and the run is marked
  `counts_graph_steps=False`, so the judge does not fail it for a graph-step count it cannot know.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from harness.inputs.scenarios import Scenario
from harness.targets.base import TargetRun, TargetUnavailable
from reference_runner.records import Generation, Request

TOP_K = 5  # as the reference engine: enough for the tie rule's top-k membership
MODE_ARGS: dict[str, dict[str, bool]] = {
    "eager": {"disable_cuda_graph": True},  # also turns off NPU graphs on Ascend
    "graph": {"disable_cuda_graph": False},
    "compile": {"disable_cuda_graph": False, "enable_torch_compile": True},
}


def engine_args(scenario: Scenario, checkpoint: Path, device: str) -> dict:
    """Keyword arguments of `sglang.Engine` for `scenario`."""
    engine, mode = scenario.engine, scenario.mode
    if mode not in MODE_ARGS:
        raise ValueError(f"the sglang target has no mode {mode!r}; choose from {', '.join(MODE_ARGS)}")
    args = {
        "model_path": str(checkpoint),
        "device": device,
        "dtype": engine.dtype,
        "tp_size": engine.tp_size,
        "dp_size": engine.dp_size,
        "cuda_graph_max_bs": engine.max_bs,
        "skip_tokenizer_init": True,  # token ids in and out; the built-in checkpoints have no tokenizer
        "disable_radix_cache": True,  # every prompt computed in full, as by the reference runner
        "random_seed": scenario.seed,
        "log_level": "error",
        **MODE_ARGS[mode],
    }
    if engine.graph_bs:
        args["cuda_graph_bs"] = list(engine.graph_bs)
    return args


def sampling_params(requests: list[Request]) -> list[dict]:
    """Greedy, exactly `max_new_tokens` per request (EOS ignored, as by the reference runner)."""
    return [{"temperature": 0, "max_new_tokens": r.max_new_tokens, "ignore_eos": True} for r in requests]


def to_generation(request: Request, output: dict, mode: str) -> Generation:
    """The record of one `generate` output: `meta_info` holds `output_token_logprobs` as
    `(logprob, token_id, text)` per step and `output_top_logprobs` as a list of those per step."""
    meta = output["meta_info"]
    gen = Generation(request.rid)
    for step, (chosen, top) in enumerate(zip(meta["output_token_logprobs"], meta["output_top_logprobs"])):
        gen.append(chosen[1], [(token, logprob) for logprob, token, _ in top], mode != "eager" and step > 0)
    return gen


class SGLangTarget:
    name = "sglang"
    can_force_tokens = False  # its public API cannot feed given tokens while reporting the model's own logprobs

    def __init__(self, device: str) -> None:
        if importlib.util.find_spec("sglang") is None:
            raise TargetUnavailable("target 'sglang' needs SGLang installed (pip install .[sglang]; on Ascend, "
                                    "SGLang's NPU build)")
        if device not in ("npu", "cuda"):
            raise TargetUnavailable(f"target 'sglang' runs on npu or cuda, not {device}")
        self.device = device

    def run(self, scenario: Scenario, checkpoint: Path, requests: list[Request]) -> TargetRun:
        import sglang

        engine = sglang.Engine(**engine_args(scenario, checkpoint, self.device))
        try:
            outputs = engine.generate(input_ids=[r.prompt_ids for r in requests],
                                      sampling_params=sampling_params(requests),
                                      return_logprob=True, top_logprobs_num=TOP_K)
        finally:
            engine.shutdown()
        generations = [to_generation(r, out, scenario.mode) for r, out in zip(requests, outputs)]
        return TargetRun(generations, counts_graph_steps=False)
