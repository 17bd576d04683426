"""The SGLang target's translation (engine arguments in, `generate` outputs to records) on the CPU.

A real run needs SGLang and an accelerator: `suites/test_hardware.py`.
"""
import importlib.util
from pathlib import Path

import pytest

from harness.cli import main
from harness.exits import EXIT_USAGE
from harness.inputs.scenarios import Scenario
from harness.judge import scenario_failures
from harness.targets.base import MIN_COVERAGE, TargetRun, TargetUnavailable, default_min_coverage
from harness.targets.sglang import SGLangTarget, engine_args, sampling_params, to_generation
from harness.verdicts.compare import Verdict
from reference_runner.engine.args import EngineArgs
from reference_runner.records import Generation, Request

SGLANG_INSTALLED = importlib.util.find_spec("sglang") is not None
REQUEST = Request("r0", [11, 12, 13], max_new_tokens=3)

# One `Engine.generate(input_ids=..., return_logprob=True, top_logprobs_num=2)` output as SGLang returns it
# with skip_tokenizer_init: logprob entries are (logprob, token_id, text) with text None.
OUTPUT = {
    "output_ids": [7, 3, 7],
    "meta_info": {
        "id": "5f1c",
        "finish_reason": {"type": "length", "length": 3},
        "prompt_tokens": 3,
        "completion_tokens": 3,
        "cached_tokens": 0,
        "output_token_logprobs": [(-0.25, 7, None), (-0.5, 3, None), (-0.125, 7, None)],
        "output_top_logprobs": [
            [(-0.25, 7, None), (-1.75, 2, None)],
            [(-0.5, 3, None), (-1.0, 7, None)],
            [(-0.125, 7, None), (-2.5, 9, None)],
        ],
    },
}


def test_output_becomes_a_generation_with_tokens_and_top_logprobs_best_first():
    gen = to_generation(REQUEST, OUTPUT, "eager")
    assert gen == Generation(
        "r0",
        output_ids=[7, 3, 7],
        top_logprobs=[[(7, -0.25), (2, -1.75)], [(3, -0.5), (7, -1.0)], [(7, -0.125), (9, -2.5)]],
        graph_steps=[False, False, False],
    )


def test_graph_mode_flags_every_decode_step_but_not_the_prefill_token():
    assert to_generation(REQUEST, OUTPUT, "graph").graph_steps == [False, True, True]


def test_eager_mode_disables_graphs():
    args = engine_args(Scenario(model="llama", baseline="oracle"), Path("/ckpt"), "npu")
    assert args == {
        "model_path": "/ckpt", "device": "npu", "dtype": "float32", "tp_size": 1, "dp_size": 1,
        "cuda_graph_max_bs": 8, "skip_tokenizer_init": True, "disable_radix_cache": True, "random_seed": 0,
        "log_level": "error", "disable_cuda_graph": True,
    }


def test_graph_mode_passes_layout_dtype_and_capture_sizes():
    engine = EngineArgs(mode="graph", tp_size=2, dp_size=2, dtype="bfloat16", max_bs=16, graph_bs=(1, 4, 16))
    args = engine_args(Scenario(model="llama", baseline="eager", engine=engine), Path("/ckpt"), "cuda")
    assert {k: args[k] for k in ("device", "dtype", "tp_size", "dp_size", "cuda_graph_max_bs", "cuda_graph_bs",
                                 "disable_cuda_graph")} == {
        "device": "cuda", "dtype": "bfloat16", "tp_size": 2, "dp_size": 2, "cuda_graph_max_bs": 16,
        "cuda_graph_bs": [1, 4, 16], "disable_cuda_graph": False,
    }
    assert "enable_torch_compile" not in args


def test_compile_mode_enables_torch_compile_with_graphs():
    args = engine_args(Scenario(model="llama", baseline="eager", engine=EngineArgs(mode="compile")), Path("/c"), "npu")
    assert (args["disable_cuda_graph"], args["enable_torch_compile"]) == (False, True)


def test_sampling_is_greedy_for_exactly_max_new_tokens():
    requests = [REQUEST, Request("r1", [5], max_new_tokens=9, arrival_step=4)]
    assert sampling_params(requests) == [
        {"temperature": 0, "max_new_tokens": 3, "ignore_eos": True},
        {"temperature": 0, "max_new_tokens": 9, "ignore_eos": True},
    ]


COMPARED = [Verdict("r0", "match", "all 3 tokens match", compared=3, generated=3)]


def test_a_graph_run_that_cannot_count_graph_steps_is_not_failed_for_zero():
    scenario = Scenario(model="llama", baseline="eager", engine=EngineArgs(mode="graph"))
    assert scenario_failures(scenario, COMPARED, TargetRun([], counts_graph_steps=False), min_coverage=0.3) == []


def test_a_graph_run_that_counts_zero_graph_steps_still_fails():
    scenario = Scenario(model="llama", baseline="eager", engine=EngineArgs(mode="graph"))
    assert scenario_failures(scenario, COMPARED, TargetRun([]), min_coverage=0.3) == [
        "no decode step replayed a graph in mode 'graph' (silent eager fallback)"]


def test_sglang_cannot_force_tokens_so_it_is_held_to_the_lower_minimum_coverage():
    assert (SGLangTarget.can_force_tokens, default_min_coverage(SGLangTarget)) == (False, MIN_COVERAGE[False])


@pytest.mark.skipif(SGLANG_INSTALLED, reason="sglang is installed here")
def test_target_without_sglang_installed_is_refused():
    with pytest.raises(TargetUnavailable, match=r"target 'sglang' needs SGLang installed \(pip install .\[sglang\]"):
        SGLangTarget("cuda")


@pytest.mark.skipif(not SGLANG_INSTALLED, reason="needs sglang installed")
def test_target_on_the_cpu_is_refused():
    with pytest.raises(TargetUnavailable, match="target 'sglang' runs on npu or cuda, not cpu"):
        SGLangTarget("cpu")


@pytest.mark.skipif(SGLANG_INSTALLED, reason="sglang is installed here")
def test_check_with_target_sglang_without_sglang_exits_2_with_one_line(capsys):
    assert main(["check", "--target", "sglang", "--device", "cpu"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("npugraph-harness: error: target 'sglang' needs SGLang installed")
