"""Router gaps of the MoE checkpoints: where two kernels may route a token to different experts."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from harness.inputs.checkpoints import ensure_checkpoint
from harness.verdicts import routing
from harness.verdicts.routing import router_gaps

SEQUENCES = [[5, 6, 7, 8, 9], list(range(3, 40))]


@pytest.mark.parametrize("model", ["qwen2_moe", "mixtral"])
def test_router_gaps_equal_those_of_transformers_router_logits(model):
    checkpoint = ensure_checkpoint(model)
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    top_k = hf.config.num_experts_per_tok
    for sequence, gaps in zip(SEQUENCES, router_gaps(checkpoint, SEQUENCES)):
        with torch.no_grad():
            layers = hf(torch.tensor([sequence]), output_router_logits=True).router_logits
        top = torch.stack([logits.reshape(len(sequence), -1) for logits in layers]).topk(top_k + 1, dim=-1).values
        expected = (top[..., -2] - top[..., -1]).min(dim=0).values
        torch.testing.assert_close(torch.tensor(gaps), expected, atol=1e-5, rtol=0)


def test_a_dense_checkpoint_has_no_router_gaps():
    assert router_gaps(ensure_checkpoint("llama"), SEQUENCES) == [[], []]


def test_only_small_moe_checkpoints_are_searched(monkeypatch):
    assert (routing.searchable(ensure_checkpoint("llama")), routing.searchable(ensure_checkpoint("qwen2_moe"))) == (
        False, True)
    monkeypatch.setattr(routing, "MAX_CHECKPOINT_BYTES", 0)  # a production-sized MoE: not loaded in float32 here
    assert routing.searchable(ensure_checkpoint("qwen2_moe")) is False
