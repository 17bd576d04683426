"""`npugraph-harness check` resolves and validates everything before the first scenario: every bad input is one
line on stderr naming the culprit (option, model, tensor, file or environment variable) and exit 2, with nothing
run; anything that would check nothing is such an input, and a scenario that judged nothing fails."""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from harness.check import MAX_BS
from harness.cli import main
from harness.inputs.checkpoints import BUILTIN_MODELS, ensure_checkpoint
from harness.inputs.real_models import REAL_MODELS
from harness.inputs.scenarios import Scenario
from harness.judge import scenario_failures
from harness.targets.base import TargetRun
from harness.targets.reference import ReferenceTarget
from harness.verdicts.compare import Verdict


def fast(model: str = "llama") -> list[str]:
    """A check of `model` that would take seconds."""
    return ["check", "--model", model, "--modes", "eager", "--workload", "batch1", "--max-new-tokens", "2"]


FAST = fast()
BUILTINS = ", ".join([*BUILTIN_MODELS, *REAL_MODELS])


def refused(argv: list[str], capsys) -> str:
    """Run the command line: it must exit 2 having printed exactly one line, on stderr; that line."""
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert (out, len(err.splitlines())) == ("", 1), err
    return err.rstrip("\n")


def error(message: str) -> str:
    return f"npugraph-harness: error: {message}"


# --- options alone ---------------------------------------------------------------------------------

OPTION_PROBES = {
    "modes-empty": (["--modes", ""], "argument --modes: empty item in '' (see npugraph-harness check --help)"),
    "modes-comma": (["--modes", ","], "argument --modes: empty item in ',' (see npugraph-harness check --help)"),
    "modes-trailing-comma": (["--modes", "eager,"],
                             "argument --modes: empty item in 'eager,' (see npugraph-harness check --help)"),
    "model-empty": (["--model", ""], "argument --model: empty item in '' (see npugraph-harness check --help)"),
    "model-comma": (["--model", ","], "argument --model: empty item in ',' (see npugraph-harness check --help)"),
    "graph-bs-comma": (["--graph-bs", ","], "argument --graph-bs: empty item in ',' (see npugraph-harness check --help)"),
    "graph-bs-not-int": (["--graph-bs", "1,two"], "argument --graph-bs: expected comma-separated integers, got '1,two' "
                                                  "(see npugraph-harness check --help)"),
    "max-bs-not-int": (["--max-bs", "abc"], "argument --max-bs: invalid int value: 'abc' (see npugraph-harness check --help)"),
    "unknown-option": (["--frobnicate"], "unrecognized arguments: --frobnicate (see npugraph-harness --help)"),
    "unknown-mode": (["--modes", "eager,turbo"],
                     "--modes: unknown mode 'turbo'; choose from eager, graph, compile, tree, compile_nograph"),
    "mode-twice": (["--modes", "eager,graph,eager"], "--modes lists 'eager' twice"),
    "model-twice": (["--model", "llama,qwen2,llama"], "--model lists 'llama' twice"),
    "graph-bs-twice": (["--graph-bs", "1,2,2"], "--graph-bs lists 2 twice"),
    "max-bs-zero": (["--max-bs", "0"], "--max-bs must be >= 1, got 0"),
    "max-bs-negative": (["--max-bs", "-3"], "--max-bs must be >= 1, got -3"),
    "max-bs-huge": (["--max-bs", "100000"], f"--max-bs 100000 is above {MAX_BS}: that many captured batch sizes would "
                                            "take ages to capture"),
    "tp-zero": (["--tp", "0"], "--tp must be >= 1, got 0"),
    "dp-negative": (["--dp", "-1"], "--dp must be >= 1, got -1"),
    "max-new-tokens-zero": (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    "min-coverage-above-1": (["--min-coverage", "1.5"], "--min-coverage must lie in 0..1, got 1.5"),
    "block-size-zero": (["--block-size", "0"], "--block-size must be >= 1, got 0"),
    "max-context-zero": (["--max-context", "0"], "--max-context must be >= 1, got 0"),
    "num-blocks-zero": (["--num-blocks", "0"], "--num-blocks must be >= 1, got 0"),
    "top-k-zero": (["--top-k", "0"], "--top-k must be >= 1, got 0"),
    "graph-bs-above-max-bs": (["--max-bs", "4", "--graph-bs", "2,8"], "--graph-bs [2, 8] must lie in 1..--max-bs (4)"),
    "num-blocks-below-one-request": (["--num-blocks", "3"], "--num-blocks 3 cannot hold one request of --max-context 256: "
                                                            "that takes 16 blocks of 16 tokens, plus block 0 (reserved)"),
    "unknown-workload": (["--workload", "nope"], "--workload nope: unknown workload 'nope'; choose one of mixed, join_leave, "
                                                 "skewed, batch1, batch3, batch5, batch7, batch8, batch13"),
    "unknown-target": (["--target", "tgi"], "--target tgi: unknown target 'tgi'; choose one of reference, sglang, vllm (or "
                                            "register one under the entry-point group npugraph_harness.targets)"),
    "unknown-device": (["--device", "tpu"], "--device tpu: unknown device 'tpu'; choose one of cpu, cuda, npu"),
    "prefill-graphs-with-dp": (["--prefill-graphs", "--dp", "2"], "prefill_graphs (--prefill-graphs) with dp_size 2: DP "
                                                                 "ranks would have to agree on one prefill bucket every "
                                                                 "step; prefill graphs run with dp_size 1"),
    "prefill-graphs-on-sglang": (["--target", "sglang", "--prefill-graphs"],
                                 "--prefill-graphs: the sglang target cannot be told to capture prefill graphs, nor report "
                                 "their steps; it is an option of the reference target"),
    "tree-on-sglang": (["--target", "sglang", "--modes", "tree"],
                       "--modes tree: the sglang target has no graph-tree mode; it is a mode of the reference target"),
}


@pytest.mark.parametrize(("argv", "message"), OPTION_PROBES.values(), ids=OPTION_PROBES)
def test_a_bad_option_exits_2_with_one_line_naming_it(capsys, argv, message):
    assert refused(["check", *argv], capsys) == error(message)


# argparse's own wording of a refused choice differs between Python releases: the choice and the hint are checked.
@pytest.mark.parametrize(("argv", "start", "hint"), [
    (["check", "--dtype", "float8"], "argument --dtype: invalid choice: 'float8' (choose from ", "check --help"),
    (["frobnicate"], "argument command: invalid choice: 'frobnicate' (choose from ", "--help"),
], ids=["dtype", "command"])
def test_an_unknown_choice_exits_2_with_one_line_naming_it(capsys, argv, start, hint):
    line = refused(argv, capsys)
    assert line.startswith(error(start)) and line.endswith(f") (see npugraph-harness {hint})")


def test_mode_tree_on_the_cpu_is_refused_before_any_scenario(capsys):
    assert refused([*fast(), "--modes", "eager,tree", "--device", "cpu"], capsys) == error(
        "--modes tree: the CPU has no graph trees (mode 'tree' runs the step through torch's CUDA graph trees or "
        "torch_npu's NPU graph trees): use --device cuda or npu")


def test_an_unknown_npugraph_device_is_named(capsys, monkeypatch):
    monkeypatch.setenv("NPUGRAPH_DEVICE", "tpu")
    assert refused(FAST, capsys) == error("NPUGRAPH_DEVICE=tpu: unknown device 'tpu'; choose one of cpu, cuda, npu")


@pytest.mark.parametrize("argv", [["--modes", ","], ["--max-bs", "100000"], ["--workload", "nope"], ["--device", "tpu"],
                                  ["--model", "gpt2"]],
                         ids=["empty-list", "number", "workload", "device", "model"])
def test_options_are_refused_before_torch_is_imported(argv):
    code = (f"import sys; from harness.cli import main; status = main(['check', *{argv!r}]); "
            "sys.exit(status if 'torch' not in sys.modules else 99)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr


# --- report paths ----------------------------------------------------------------------------------

def test_a_report_path_that_is_a_directory_is_refused(tmp_path, capsys):
    assert refused([*FAST, "--json", str(tmp_path)], capsys) == error(f"--json {tmp_path}: is a directory, not a file")


def test_a_report_path_under_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    path = tmp_path / "file" / "check.xml"
    assert re.fullmatch(re.escape(error(f"--junit {path}: cannot write there (")) + r"\[Errno \d+\] .*\)",
                        refused([*FAST, "--junit", str(path)], capsys))


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc, where nothing can be created")
def test_a_report_path_where_nothing_can_be_written_is_refused(capsys):
    line = refused([*FAST, "--json", "/proc/npugraph/check.json"], capsys)
    assert line == error("--json /proc/npugraph/check.json: cannot write there ([Errno 2] No such file or directory: "
                         "'/proc/npugraph')")


def test_two_reports_into_one_file_are_refused(tmp_path, capsys):
    path = tmp_path / "check.out"
    assert refused([*FAST, "--json", str(path), "--junit", str(path)], capsys) == error(
        f"--json and --junit both write {path}")


# --- models, checkpoints and devices ---------------------------------------------------------------

@pytest.fixture
def nan_checkpoint(tmp_path):
    """A copy of the tiny llama checkpoint with one NaN weight."""
    path = shutil.copytree(ensure_checkpoint("llama"), tmp_path / "llama-nan", ignore=shutil.ignore_patterns("manifest.json"))
    tensors = load_file(path / "model.safetensors")
    tensors["model.norm.weight"][5] = float("nan")
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


NAN_MESSAGE = "{path}: {path}/model.safetensors: tensor 'model.norm.weight' holds nan at flat index 5 of the loaded part"


def test_an_unknown_model_is_named(capsys):
    assert refused(fast("gpt2"), capsys) == error(
        f"--model gpt2: 'gpt2' is neither a checkpoint directory nor a builtin model ({BUILTINS})")


def test_a_bad_model_later_in_the_list_fails_before_any_model_runs(nan_checkpoint, capsys):
    message = error("--model " + NAN_MESSAGE.format(path=nan_checkpoint))
    assert refused(fast(f"llama,{nan_checkpoint}"), capsys) == message  # one line: not a progress line before it


@pytest.mark.parametrize("tp", ["1", "2"])
def test_a_broken_checkpoint_exits_2_at_any_tp(nan_checkpoint, capsys, tp):
    argv = [*fast(str(nan_checkpoint)), "--tp", tp]
    assert refused(argv, capsys) == error("--model " + NAN_MESSAGE.format(path=nan_checkpoint))


def test_an_unsupported_architecture_exits_2_before_the_oracle_starts(tmp_path, capsys):
    path = shutil.copytree(ensure_checkpoint("llama"), tmp_path / "neox")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "architectures": ["GPTNeoXForCausalLM"]}))
    line = refused(fast(str(path)), capsys)
    assert line.startswith(error(f"--model {path}: architecture 'GPTNeoXForCausalLM' is not supported; supported: "))


def test_an_unusable_npugraph_cache_is_named(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("NPUGRAPH_CACHE", str(tmp_path / "file"))
    line = refused(FAST, capsys)
    assert line.startswith(error(f"--model llama: NPUGRAPH_CACHE={tmp_path / 'file'}: cannot build 'llama' there "
                                 "(FileExistsError: "))


@pytest.mark.skipif(torch.cuda.is_available(), reason="cuda is available here")
@pytest.mark.parametrize("where", ["option", "environment"])
def test_an_absent_device_is_named(capsys, monkeypatch, where):
    if where == "option":
        assert refused([*FAST, "--device", "cuda"], capsys) == error("device 'cuda' is not available: no CUDA GPU visible "
                                                                     "to torch")
    else:
        monkeypatch.setenv("NPUGRAPH_DEVICE", "cuda")
        assert refused(FAST, capsys) == error("NPUGRAPH_DEVICE=cuda: device 'cuda' is not available: no CUDA GPU visible "
                                              "to torch")


@pytest.mark.skipif(importlib.util.find_spec("sglang") is not None, reason="sglang is installed here")
def test_an_absent_target_engine_is_named(capsys):
    assert refused([*FAST, "--target", "sglang"], capsys) == error(
        "target 'sglang' needs SGLang installed: on a CPU host sglang without its dependencies, then "
        "packaging/sglang-cpu.txt; on cuda pip install .[sglang]; on Ascend, SGLang's NPU build (docs/engines.md)")


# --- limits ----------------------------------------------------------------------------------------

LIMIT_PROBES = {
    "new-tokens-beyond-context": (["--workload", "mixed", "--max-new-tokens", "250"],
                                  "--max-new-tokens 250: request 'r1' of workload 'mixed' needs 17 prompt + 243 new tokens, "
                                  "beyond --max-context 256"),
    "new-tokens-huge": (["--max-new-tokens", "100000"],
                        "--max-new-tokens 100000: request 'b0' of workload 'batch1' needs 5 prompt + 100000 new tokens, "
                        "beyond --max-context 256"),
    "context-beyond-positions": (["--max-context", "2048"],
                                 "--max-context 2048 exceeds model 'llama''s max_position_embeddings 1024"),
    "graph-mode-without-a-decode-step": (["--modes", "eager,graph", "--max-new-tokens", "1"],
                                         "--max-new-tokens 1: no request of workload 'batch1' decodes after its prefill "
                                         "(which gives the first token), so mode 'graph' would replay nothing: give 2 or more"),
    "top-k-beyond-vocab": (["--top-k", "1000"], "--top-k 1000 exceeds model 'llama''s vocab_size 512"),
    "tp-not-dividing-heads": (["--tp", "3"], "--model llama: tp 3 does not divide num_attention_heads 4"),
    "more-ranks-than-available": (["--tp", "4", "--dp", "4"],
                                  "--model llama: tp 4 x dp 4 = 16 ranks, but device 'cpu' has 8 available here"),
}


@pytest.mark.parametrize(("argv", "message"), LIMIT_PROBES.values(), ids=LIMIT_PROBES)
def test_a_limit_is_checked_before_any_work(capsys, argv, message):
    assert refused([*FAST, *argv], capsys) == error(message)


def test_a_kv_cache_beyond_the_available_memory_is_refused(capsys):
    line = refused([*FAST, "--num-blocks", str(10**9)], capsys)
    assert re.fullmatch(re.escape(error("the KV cache of model 'llama' needs 7,812,500 MiB (1,000,000,000 blocks x 16 "
                                        "tokens x 2 layers x 2 KV heads x 16 x 2 (K, V) x 4 bytes), but ")) + r"[\d,]+ "
                        + re.escape("MiB are available (MemAvailable in /proc/meminfo): lower --max-bs, --num-blocks or "
                                    "--max-context"), line)


def test_ranks_on_the_cpu_share_its_memory(capsys, monkeypatch):
    # 6400 blocks x 16 tokens x 2 layers x 2 KV heads x 16 x 2 x 4 bytes = 50 MiB per rank: the one-rank baseline
    # fits in 150 MiB, four DP ranks on the same host do not.
    monkeypatch.setattr("harness.check.available_memory", lambda device: (150 * 2**20, "test"))
    assert refused([*FAST, "--num-blocks", "6400", "--dp", "4"], capsys) == error(
        "the KV cache of model 'llama' needs 200 MiB (6,400 blocks x 16 tokens x 2 layers x 2 KV heads x 16 x 2 (K, V) x "
        "4 bytes x 4 ranks), but 150 MiB are available (test): lower --max-bs, --num-blocks or --max-context")


# --- nothing checked is never a pass ---------------------------------------------------------------

def test_a_scenario_that_judged_no_request_fails():
    assert scenario_failures(Scenario("llama", "oracle"), [], TargetRun([]), min_coverage=0.9) == [
        "no request was judged: a scenario that compared nothing cannot pass"]


def test_a_scenario_that_judged_a_request_has_no_failure():
    judged = [Verdict("r0", "match", "same tokens", compared=3, generated=3)]
    assert scenario_failures(Scenario("llama", "oracle"), judged, TargetRun([]), min_coverage=0.9) == []


def test_a_target_that_can_neither_force_nor_be_continued_is_refused(monkeypatch, capsys):
    class Unforceable(ReferenceTarget):
        name, forcing = "unforceable", None

    monkeypatch.setattr("harness.targets.get_target", lambda name, device: Unforceable(device))
    assert refused(FAST, capsys) == error(
        "--target unforceable: it can neither force tokens in its loop nor be continued (forcing=None, not one of "
        "in_loop, continuation), so its scenarios would stop comparing at their first near-tie, below the minimum coverage")
