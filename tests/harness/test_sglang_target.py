"""The SGLang target's translation (engine arguments named as the installed ServerArgs names them, `generate`
outputs to records), what it refuses per device, and its arguments checked against the installed SGLang's ServerArgs.

Real runs: `suites/test_sglang.py` (SGLang's CPU engine), `suites/test_hardware.py` (graphs on an accelerator).
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.inputs.scenarios import Scenario
from harness.judge import scenario_failures
from harness.targets.base import TargetRun, TargetUnavailable
from harness.targets.sglang import (
    WORKER_ENV,
    SGLangTarget,
    argument_problems,
    check_supported,
    engine_args,
    sampling_params,
    to_generation,
    worker_env,
)
from harness.targets.sglang_cpu import STARTUP_DIR
from harness.verdicts.compare import Verdict
from reference_runner.engine.args import EngineArgs
from reference_runner.records import Generation, Request

SGLANG_INSTALLED = importlib.util.find_spec("sglang") is not None
REQUEST = Request("r0", [11, 12, 13], max_new_tokens=3)
# ServerArgs field names the adapter chooses from: sglang 0.5.23's, and those of releases before the per-phase
# graph options (the rest of their 500-odd fields left out).
CURRENT = {"model_path", "device", "dtype", "tp_size", "dp_size", "skip_tokenizer_init", "disable_radix_cache",
           "random_seed", "log_level", "enable_torch_compile", "cuda_graph_backend_decode", "cuda_graph_backend_prefill",
           "cuda_graph_max_bs_decode", "cuda_graph_bs_decode", "sampling_defaults", "attention_backend",
           "disable_cuda_graph", "max_total_tokens"}
PREVIOUS = {"model_path", "device", "dtype", "tp_size", "dp_size", "skip_tokenizer_init", "disable_radix_cache",
            "random_seed", "log_level", "enable_torch_compile", "disable_cuda_graph", "disable_piecewise_cuda_graph",
            "cuda_graph_max_bs", "cuda_graph_bs", "attention_backend", "max_total_tokens"}

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


def test_eager_mode_disables_decode_and_prefill_graphs_by_current_names():
    args = engine_args(EngineArgs(), "/ckpt", "cuda", 0, CURRENT)
    assert args == {
        "model_path": "/ckpt", "device": "cuda", "dtype": "float32", "tp_size": 1, "dp_size": 1,
        "skip_tokenizer_init": True, "disable_radix_cache": True, "random_seed": 0, "log_level": "error",
        "enable_torch_compile": False, "cuda_graph_backend_decode": "disabled", "cuda_graph_backend_prefill": "disabled",
        "cuda_graph_max_bs_decode": 8, "sampling_defaults": "openai", "max_total_tokens": 4112,
    }


def test_kv_cache_room_is_the_reference_runners_in_tokens():
    engine = EngineArgs(num_blocks=100, block_size=32)
    assert engine_args(engine, "/c", "cuda", 0, CURRENT)["max_total_tokens"] == 3200


def test_graph_mode_passes_layout_dtype_and_decode_capture_sizes():
    engine = EngineArgs(mode="graph", tp_size=2, dp_size=2, dtype="bfloat16", max_bs=16, graph_bs=(1, 4, 16))
    args = engine_args(engine, "/ckpt", "cuda", 0, CURRENT)
    assert {k: args[k] for k in ("dtype", "tp_size", "dp_size", "cuda_graph_backend_decode", "cuda_graph_backend_prefill",
                                 "cuda_graph_max_bs_decode", "cuda_graph_bs_decode", "enable_torch_compile")} == {
        "dtype": "bfloat16", "tp_size": 2, "dp_size": 2, "cuda_graph_backend_decode": "full",
        "cuda_graph_backend_prefill": "disabled", "cuda_graph_max_bs_decode": 16, "cuda_graph_bs_decode": [1, 4, 16],
        "enable_torch_compile": False,
    }


def test_compile_mode_enables_torch_compile_with_decode_graphs():
    args = engine_args(EngineArgs(mode="compile"), "/c", "npu", 0, CURRENT)
    assert (args["cuda_graph_backend_decode"], args["enable_torch_compile"]) == ("full", True)


def test_cpu_runs_sglangs_cpu_engine_with_torch_native_attention_and_the_stand_ins_first_on_its_path():
    assert engine_args(EngineArgs(), "/c", "cpu", 0, CURRENT)["attention_backend"] == "torch_native"
    env = worker_env("cpu")
    assert env["SGLANG_USE_CPU_ENGINE"] == "1"
    assert env["PYTHONPATH"].split(os.pathsep)[:2] == [str(STARTUP_DIR), sys.path[0]]
    assert worker_env("npu") == {"ASCEND_USE_FIA": "1"}


def test_npu_selects_the_fia_decode_path():
    assert engine_args(EngineArgs(mode="graph"), "/c", "npu", 0, CURRENT)["attention_backend"] == "ascend"
    assert WORKER_ENV["npu"] == {"ASCEND_USE_FIA": "1"}
    assert "attention_backend" not in engine_args(EngineArgs(mode="graph"), "/c", "cuda", 0, CURRENT)


@pytest.mark.parametrize(("mode", "expected"), [
    ("eager", {"disable_cuda_graph": True, "disable_piecewise_cuda_graph": True, "cuda_graph_max_bs": 8,
               "cuda_graph_bs": [1, 2]}),
    ("graph", {"disable_cuda_graph": False, "disable_piecewise_cuda_graph": True, "cuda_graph_max_bs": 8,
               "cuda_graph_bs": [1, 2]}),
])
def test_an_older_sglang_gets_the_names_it_had(mode, expected):
    args = engine_args(EngineArgs(mode=mode, graph_bs=(1, 2)), "/c", "cuda", 0, PREVIOUS)
    assert {k: v for k, v in args.items() if "graph" in k} == expected
    assert "sampling_defaults" not in args  # an option it did not have


def test_an_sglang_without_any_decode_graph_option_is_refused():
    with pytest.raises(TargetUnavailable, match=r"^the installed SGLang's ServerArgs has none of cuda_graph_backend_decode, "
                                                r"disable_cuda_graph$"):
        engine_args(EngineArgs(), "/c", "cuda", 0, CURRENT - {"cuda_graph_backend_decode", "disable_cuda_graph"})


def test_argument_problems_name_unknown_fields_and_values_outside_their_choices():
    fields = {"cuda_graph_backend_decode": ("full", "breakable", "disabled"), "tp_size": None}
    assert argument_problems({"cuda_graph_backend_decode": "piecewise", "tp_size": 2, "cuda_graph_max_bs": 8}, fields) == [
        "cuda_graph_max_bs is not a ServerArgs field",
        "cuda_graph_backend_decode='piecewise' is not one of ('full', 'breakable', 'disabled')",
    ]


@pytest.mark.skipif(not SGLANG_INSTALLED, reason="needs sglang installed (CI installs sglang 0.5.23 without its "
                                                 "dependencies, docs/engines.md)")
def test_every_argument_is_a_field_of_the_installed_server_args_with_an_allowed_value():
    # In a process of its own: importing sglang's ServerArgs sets torch's cache directories in the importer.
    # Every mode the SGLang target runs on any device (tree and compile_nograph are the reference target's alone).
    code = ("import json\n"
            "from harness.targets.sglang import MODES, WORKER_ENV, argument_problems, engine_args, server_args_fields\n"
            "from reference_runner.engine.args import EngineArgs\n"
            "fields = server_args_fields()\n"
            "print(json.dumps({f'{d}-{m}': argument_problems(engine_args(EngineArgs(mode=m, graph_bs=(1, 8)), '/c', d, 0, "
            "fields), fields) for d in WORKER_ENV for m in MODES['cuda']} | {'fields': len(fields)}))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    problems = json.loads(done.stdout.splitlines()[-1])
    assert problems.pop("fields") > 100  # read from the real ServerArgs
    assert problems == {f"{d}-{m}": [] for d in ("cpu", "npu", "cuda") for m in ("eager", "graph", "compile")}


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


def test_sglang_is_compared_past_near_ties_by_continuation():
    assert SGLangTarget.forcing == "continuation"


@pytest.mark.skipif(SGLANG_INSTALLED, reason="sglang is installed here")
def test_target_without_sglang_installed_is_refused():
    with pytest.raises(TargetUnavailable, match=r"target 'sglang' needs SGLang installed: on a CPU host sglang without "
                                                r"its dependencies, then packaging/sglang-cpu.txt"):
        SGLangTarget("cuda")


def config_dir(tmp_path: Path, architecture: str) -> Path:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": [architecture]}))
    return tmp_path


@pytest.mark.parametrize(("engine", "refusal"), [
    (EngineArgs(mode="graph"), r"^target 'sglang' has no graph mode on cpu: SGLang's CPU graph runner \(torch.compile\) "
                               r"needs its Intel AMX attention backend.*; choose from eager$"),
    (EngineArgs(mode="compile"), r"^target 'sglang' has no compile mode on cpu: .*; choose from eager$"),
    (EngineArgs(tp_size=2), r"^target 'sglang' runs one rank on cpu .*: drop --tp and --dp$"),
], ids=["graph", "compile", "tp2"])
def test_cpu_refuses_graphs_and_several_ranks_in_one_line(tmp_path, engine, refusal):
    with pytest.raises(TargetUnavailable, match=refusal):
        check_supported("cpu", Scenario("llama", "oracle", engine), config_dir(tmp_path, "LlamaForCausalLM"))


def test_cpu_refuses_a_moe_model_naming_the_piece_it_lacks(tmp_path):
    with pytest.raises(TargetUnavailable, match=r"^target 'sglang' cannot run \S+ \(Qwen2MoeForCausalLM\) on cpu: its "
                                                r"shared-expert gate is a triton kernel \(fused_gate_sigmoid_mul_add"):
        check_supported("cpu", Scenario("qwen2_moe", "oracle"), config_dir(tmp_path, "Qwen2MoeForCausalLM"))


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Qwen3MoeForCausalLM", "MixtralForCausalLM"])
def test_cpu_accepts_eager_dense_and_the_moe_models_its_cpu_path_runs(tmp_path, architecture):
    check_supported("cpu", Scenario("m", "oracle"), config_dir(tmp_path, architecture))


def test_accelerators_accept_every_mode_and_architecture(tmp_path):
    for device in ("cuda", "npu"):
        for mode in ("eager", "graph", "compile"):
            check_supported(device, Scenario("m", "eager", EngineArgs(mode=mode, tp_size=2)),
                            config_dir(tmp_path, "Qwen2MoeForCausalLM"))
