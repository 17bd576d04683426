"""Tensor-parallel weight sharding: tp=2 ranks (gloo) produce the logits of a single unsharded rank."""
import pytest
import torch
from multirank import run_ranks

from reference_runner.engine.forward_batch import ForwardBatch, ForwardMode
from reference_runner.engine.model_runner import ModelRunner
from reference_runner.parallel.state import ParallelState, init_parallel

LENS = [5, 11]  # one prefill of two prompts, then one decode step


def prefill_then_decode(checkpoint, parallel: ParallelState) -> list[torch.Tensor]:
    runner = ModelRunner(checkpoint, device="cpu", dtype=torch.float32, max_context=64, block_size=8, num_blocks=8,
                         parallel=parallel)
    kv, rids = runner.kv_cache, ["a", "b"]
    for rid, n in zip(rids, LENS):
        kv.reserve(rid, n + 1)
    tables = kv.block_table_tensor(rids, "cpu")
    prefill = ForwardBatch(
        ForwardMode.EXTEND, 2, input_ids=torch.arange(sum(LENS)) * 37 % 512,
        positions=torch.tensor([p for n in LENS for p in range(n)]),
        out_cache_loc=torch.tensor(kv.slots("a", 0, LENS[0]) + kv.slots("b", 0, LENS[1])),
        seq_lens=torch.tensor(LENS, dtype=torch.int32), seq_lens_cpu=LENS, block_tables=tables, extend_seq_lens=LENS)
    with torch.no_grad():
        first = runner.forward_eager(prefill)
        seq_lens = [n + 1 for n in LENS]
        decode = ForwardBatch(
            ForwardMode.DECODE, 2, input_ids=first.argmax(-1), positions=torch.tensor(LENS),
            out_cache_loc=torch.tensor([kv.slots(rid, n, n + 1)[0] for rid, n in zip(rids, LENS)]),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32), seq_lens_cpu=seq_lens, block_tables=tables)
        return [first, runner.forward_eager(decode)]


def tp2_logits(checkpoints: dict) -> dict:
    parallel = init_parallel(2, 1, "cpu", timeout_s=60)
    return {name: [t.tolist() for t in prefill_then_decode(path, parallel)] for name, path in checkpoints.items()}


@pytest.mark.multirank
def test_tp2_matches_tp1():
    from harness.inputs.checkpoints import ensure_checkpoint

    # qwen2: q/k/v biases and tied embeddings; llama_kv1: one kv head, replicated on both ranks.
    checkpoints = {name: ensure_checkpoint(name) for name in ("qwen2", "llama_kv1")}
    outputs = run_ranks(tp2_logits, 2, checkpoints, timeout_s=120)
    for name, path in checkpoints.items():
        expected = prefill_then_decode(path, ParallelState())
        for rank in range(2):
            for got, want in zip(outputs[rank][name], expected):
                torch.testing.assert_close(torch.tensor(got), want, atol=1e-4, rtol=1e-4)
