"""The vLLM target's translation (LLM arguments per device and mode, outputs to records) and its refusals, on
the CPU. A real run needs vLLM installed: suites/test_vllm.py; its arguments checked by vLLM itself below."""
import dataclasses
import importlib.util
import json
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest

from harness.cli import main
from harness.exits import EXIT_USAGE
from harness.inputs.checkpoints import ensure_checkpoint
from harness.inputs.scenarios import Scenario
from harness.targets.base import TargetUnavailable
from harness.targets.vllm import (
    CPU_HEAD_SIZES,
    MODE_ARGS,
    VLLMTarget,
    check_supported,
    cpu_head_sizes,
    kv_cache_bytes,
    llm_args,
    sampling_params,
    source_literal,
    to_generation,
)
from harness.targets.worker import WorkerJob
from reference_runner.engine.args import EngineArgs
from reference_runner.records import Generation, Request

VLLM_INSTALLED = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not VLLM_INSTALLED, reason="needs vLLM installed (README, \"Judging your engine\")")
REQUEST = Request("r0", [11, 12, 13], max_new_tokens=2)
HD32 = {"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32}


@dataclass
class Logprob:  # vllm.logprobs.Logprob as vLLM 0.32 returns it with detokenize=False
    logprob: float
    rank: int
    decoded_token: str | None = None


def job(mode: str = "eager", device: str = "cpu", **engine) -> WorkerJob:
    return WorkerJob("harness.targets.vllm:start_engine", "/ckpt", EngineArgs(mode=mode, **engine), device, seed=3)


def test_steps_become_the_chosen_token_and_the_top_k_by_rank():
    # The chosen token comes first with its own rank; when it is the top-1 it is listed once.
    steps = [{7: Logprob(-0.25, 1), 2: Logprob(-1.75, 2), 9: Logprob(-2.0, 3)},
             {3: Logprob(-0.5, 1), 7: Logprob(-1.0, 2), 4: Logprob(-3.0, 3)}]
    assert to_generation(REQUEST, [7, 3], steps, 3, captures_graphs=False) == Generation(
        "r0", [7, 3], [[(7, -0.25), (2, -1.75), (9, -2.0)], [(3, -0.5), (7, -1.0), (4, -3.0)]], [False, False])


def test_a_chosen_token_below_the_top_k_is_kept_out_of_the_top_k():
    # vLLM lists a chosen token outside the top k first, with its rank, then the top k: 6 entries for k = 5.
    step = {193: Logprob(-4.65, 20), 17: Logprob(-1.95, 1), 138: Logprob(-2.1, 2)}
    gen = to_generation(REQUEST, [193], [step], 2, captures_graphs=False)
    assert (gen.output_ids, gen.top_logprobs) == ([193], [[(17, -1.95), (138, -2.1)]])


def test_decode_steps_are_flagged_as_graph_steps_only_where_the_mode_captures_graphs():
    steps = [{7: Logprob(-0.25, 1)}, {3: Logprob(-0.5, 1)}]
    assert to_generation(REQUEST, [7, 3], steps, 1, captures_graphs=True).graph_steps == [False, True]


def test_eager_on_cpu_disables_compilation_and_sizes_the_kv_cache_like_the_reference_runner():
    assert llm_args(job(), HD32) == {
        "model": "/ckpt", "skip_tokenizer_init": True, "dtype": "float32", "seed": 3, "max_model_len": 256,
        "tensor_parallel_size": 1, "enable_prefix_caching": False, "generation_config": "vllm",
        "kv_cache_memory_bytes": 4 << 20, "logprobs_mode": "raw_logprobs",
        "logits_processors": ["harness.targets.vllm_forcing:ForceTokens"], "enforce_eager": True,
    }


def test_kv_cache_holds_num_blocks_when_given():
    assert kv_cache_bytes(HD32, EngineArgs(num_blocks=10, block_size=16, dtype="bfloat16")) == 160 * 2 * 2 * 2 * 32 * 2


def test_compile_on_cpu_is_vllms_default():
    args = llm_args(job("compile"), HD32)
    assert "enforce_eager" not in args
    assert "compilation_config" not in args


def test_graph_on_cuda_captures_full_decode_graphs_without_torch_compile_at_the_reference_sizes():
    args = llm_args(job("graph", "cuda", max_bs=16, graph_bs=(1, 4, 16)), HD32)
    assert args["compilation_config"] == {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY", "max_cudagraph_capture_size": 16,
                                          "cudagraph_capture_sizes": [1, 4, 16]}
    assert "enforce_eager" not in args


@pytest.mark.parametrize(("device", "expected"), [
    ("cuda", {"max_cudagraph_capture_size": 8}),
    ("npu", {"max_cudagraph_capture_size": 8}),
])
def test_compile_on_accelerators_keeps_vllms_graph_mode_at_the_reference_sizes(device, expected):
    assert llm_args(job("compile", device), HD32)["compilation_config"] == expected


def test_graph_on_npu_captures_full_decode_acl_graphs():
    assert llm_args(job("graph", "npu"), HD32)["compilation_config"] == {"cudagraph_mode": "FULL_DECODE_ONLY",
                                                                         "max_cudagraph_capture_size": 8}


def test_sampling_is_greedy_for_exactly_max_new_tokens_with_top_k_logprobs():
    assert sampling_params([REQUEST], 5) == [
        {"temperature": 0, "max_tokens": 2, "ignore_eos": True, "logprobs": 5, "detokenize": False}]


def test_a_forced_request_carries_its_tokens_to_the_forcing_logits_processor():
    forced = dataclasses.replace(REQUEST, forced_from=1, forced_ids=[9])
    assert sampling_params([forced], 5)[0]["extra_args"] == {"npugraph_forced": {"from": 1, "ids": [9]}}


def test_source_literal_reads_a_method_return_and_a_module_assignment(tmp_path):
    source = tmp_path / "backend.py"
    source.write_text("class Other:\n    def sizes(cls):\n        return [1]\n\n"
                      "class Backend:\n    @classmethod\n    def sizes(cls) -> list[int]:\n        return [32, 64]\n\n"
                      "MODELS = {'LlamaForCausalLM': ('llama', 'LlamaForCausalLM')}\nCOMPUTED = sorted([2, 1])\n")
    assert source_literal(source, "sizes", "Backend") == [32, 64]
    assert source_literal(source, "MODELS") == {"LlamaForCausalLM": ("llama", "LlamaForCausalLM")}
    assert source_literal(source, "COMPUTED") is None
    assert source_literal(source, "missing") is None
    assert source_literal(None, "sizes", "Backend") is None


def test_cpu_head_sizes_are_vllms_own():
    assert cpu_head_sizes() == CPU_HEAD_SIZES  # read from vLLM 0.32.0 where installed, the cited list elsewhere


@pytest.mark.parametrize(("model", "engine", "message"), [
    ("llama", EngineArgs(), "target 'vllm' cannot run {ckpt}: vLLM's CPU attention does not support head_dim 16 (only 32, "
                            "64, 80, 96, 112, 128, 160, 192, 224, 256, 512); the built-in llama_hd32 has head_dim 32"),
    ("llama_hd32", EngineArgs(mode="graph"), "target 'vllm' has no graph mode on cpu (vLLM captures no graphs there); "
                                             "choose from eager, compile"),
    ("llama_hd32", EngineArgs(dp_size=2), "target 'vllm' runs one data-parallel rank (vLLM's LLM class serves more from "
                                          "separate processes): drop --dp"),
])
def test_unsupported_scenarios_are_refused_in_one_line(model, engine, message):
    checkpoint = ensure_checkpoint(model)
    with pytest.raises(TargetUnavailable, match=f"^{re.escape(message.format(ckpt=checkpoint))}$"):
        check_supported("cpu", Scenario(model, "oracle", engine), checkpoint)


def test_the_head_dim_32_checkpoint_is_accepted_in_every_mode_of_every_device():
    checkpoint = ensure_checkpoint("llama_hd32")
    for device, modes in MODE_ARGS.items():
        for mode in modes:
            check_supported(device, Scenario("llama_hd32", "eager", EngineArgs(mode=mode)), checkpoint)


@needs_vllm
def test_an_architecture_vllm_does_not_implement_is_refused(tmp_path):
    config = json.loads((ensure_checkpoint("llama_hd32") / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["TinyStoryForCausalLM"]}))
    with pytest.raises(TargetUnavailable, match=r"vLLM has no text-generation model for architecture TinyStoryForCausalLM$"):
        check_supported("cpu", Scenario("x", "oracle"), tmp_path)


@needs_vllm
def test_check_refuses_an_unsupported_head_dim_before_starting_vllm(capsys):
    assert main(["check", "--target", "vllm", "--model", "llama", "--device", "cpu"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("npugraph-harness: error: --model llama: target 'vllm' cannot run ")
    assert "does not support head_dim 16" in err


@needs_vllm
def test_every_argument_is_one_vllm_accepts():
    # In a process of its own: importing vllm patches torch's inductor in the importing process.
    cases = {f"{device}-{mode}": llm_args(job(mode, device, graph_bs=(1, 2, 4, 8)), HD32)
             for device, modes in MODE_ARGS.items() for mode in modes}
    code = ("import json, sys\n"
            "from vllm.config import CompilationConfig\n"
            "from vllm.engine.arg_utils import EngineArgs\n"
            "for args in json.loads(sys.argv[1]).values():\n"
            "    EngineArgs(**args)\n"
            "    CompilationConfig(**args.get('compilation_config', {}))\n")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(cases)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.skipif(VLLM_INSTALLED, reason="vllm is installed here")
def test_target_without_vllm_installed_is_refused():
    with pytest.raises(TargetUnavailable, match=r"^target 'vllm' needs vLLM installed: "):
        VLLMTarget("cpu")
