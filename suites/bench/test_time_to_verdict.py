"""Time to a verdict on a real 30-layer model (`smollm2`), each `check` a fresh process, ratios measured in one run:

- `check --modes eager,graph` against one plain batched transformers `generate` of the same requests (the greedy
  tokens and their logits, the least a user would run to look at the output): at most 4x. The eager run is made
  once and serves both scenarios, and transformers scores the engine's tokens in one forward instead of decoding.
  Issue #14 asked for 1.5x, which the CPU cannot give: a graph-vs-eager verdict needs two whole engine runs, and
  each costs about one `generate` (the eager run 9.5 s against 8.3-9.3 s; SimNPUGraph replays the same kernels,
  so graph mode is no faster here), plus capture and the interpreter's start. Measured 3.6x (it was 6.7x).
- `check --modes compile` against `check --modes graph`: at most 5x. Identical decoder layers compile once
  (`reference_runner/sim/piecewise.py`), so compile cost follows the distinct pieces of the step (three per
  captured size), not its depth. It runs with an empty inductor cache, as a user's first run does.

Each reference is timed in pedantic's untimed setup, right before the timed check, under the same load.
"""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from harness.inputs.checkpoints import ensure_checkpoint
from harness.inputs.real_models import missing_packages
from harness.inputs.workloads import make_requests
from reference_runner.models.loader import read_config

ROOT = Path(__file__).resolve().parents[2]
MODEL = "smollm2"
# Check-vs-generate was 6.7x before the shared eager run and the oracle's scoring (#14 asked for 1.5x: see above),
# compile-vs-graph 20x when the whole step compiled as one piece.
MAX_CHECK_VS_GENERATE = 4
MAX_COMPILE_VS_GRAPH = 5


@pytest.fixture(scope="module")
def checkpoint() -> Path:
    if problem := missing_packages(MODEL):
        pytest.skip(problem)
    return ensure_checkpoint(MODEL)  # converted before any timing


def timed_check(modes: str, device: str, env: dict[str, str] | None = None) -> float:
    """Seconds `npugraph-harness check --model smollm2 --modes <modes>` takes in a fresh process; it must pass."""
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "harness", "check", "--model", MODEL, "--modes", modes,
                          "--device", device], cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    assert run.returncode == 0, f"check --modes {modes} exited {run.returncode}:\n{run.stdout}{run.stderr[-3000:]}"
    return seconds


def generate_seconds(checkpoint: Path) -> float:
    """Seconds of one batched greedy transformers `generate` of the check's requests, logits kept (loading aside)."""
    requests = make_requests("mixed", read_config(checkpoint).vocab_size, 32)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    width = max(len(r.prompt_ids) for r in requests)
    input_ids = torch.tensor([[0] * (width - len(r.prompt_ids)) + r.prompt_ids for r in requests])  # left-padded
    attention_mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in requests])
    new_tokens = max(r.max_new_tokens for r in requests)
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return time.perf_counter() - start


def record_ratio(benchmark, ratio: str, numerator: float, denominator: float, seconds: dict[str, float],
                 limit: float) -> bool:
    """Record `ratio` in the benchmark's `extra_info` (the report's "Time to verdict" reads it); whether it is met."""
    measured = numerator / denominator
    benchmark.extra_info.update(ratio=ratio, model=MODEL, measured=round(measured, 2), limit=limit,
                                seconds={side: round(s, 1) for side, s in seconds.items()})
    return measured <= limit


def test_check_eager_graph_takes_at_most_4x_a_transformers_generate(benchmark, device, checkpoint):
    seconds = {}
    benchmark.group = f"{MODEL}: time to verdict"
    benchmark.pedantic(lambda: seconds.update(check=timed_check("eager,graph", device)),
                       setup=lambda: seconds.update(generate=generate_seconds(checkpoint)), rounds=1, iterations=1)
    assert record_ratio(benchmark, "check_vs_generate", seconds["check"], seconds["generate"], seconds,
                        MAX_CHECK_VS_GENERATE)


def test_compile_costs_at_most_five_times_graph_mode(benchmark, device, checkpoint, tmp_path):
    seconds = {}
    empty_inductor_cache = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    benchmark.group = f"{MODEL}: compile vs graph"
    benchmark.pedantic(lambda: seconds.update(compile=timed_check("compile", device, empty_inductor_cache)),
                       setup=lambda: seconds.update(graph=timed_check("graph", device)), rounds=1, iterations=1)
    assert record_ratio(benchmark, "compile_vs_graph", seconds["compile"], seconds["graph"], seconds,
                        MAX_COMPILE_VS_GRAPH)
