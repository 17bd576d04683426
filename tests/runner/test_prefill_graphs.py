"""Prefill graphs (`graphs/prefill.py`): a prefill run as one decode-shaped row per token, the token buckets it is
captured at, and the engine option that turns it on."""
import json

import pytest
import torch

from harness.cli import build_parser
from harness.inputs.checkpoints import ensure_checkpoint
from reference_runner.engine.args import EngineArgs
from reference_runner.engine.engine import Engine
from reference_runner.engine.forward_batch import ForwardBatch, ForwardMode
from reference_runner.graphs.prefill import prefill_token_buckets, token_rows


@pytest.mark.parametrize(("max_context", "buckets"), [
    (256, [16, 32, 64, 128, 256]), (64, [16, 32, 64]), (100, [16, 32, 64, 100]), (8, [8])])
def test_prefill_is_captured_at_powers_of_two_tokens_up_to_max_context(max_context, buckets):
    assert prefill_token_buckets(max_context) == buckets


def prefill_batch(engine: Engine, prompts: list[list[int]]) -> ForwardBatch:
    kv, lens = engine.kv_cache, [len(p) for p in prompts]
    slots = []
    for i, n in enumerate(lens):
        kv.reserve(f"r{i}", n)
        slots += kv.slots(f"r{i}", 0, n)
    return ForwardBatch(
        forward_mode=ForwardMode.EXTEND, batch_size=len(prompts), input_ids=torch.tensor([t for p in prompts for t in p]),
        positions=torch.tensor([i for n in lens for i in range(n)]), out_cache_loc=torch.tensor(slots),
        seq_lens=torch.tensor(lens, dtype=torch.int32), seq_lens_cpu=lens,
        block_tables=kv.block_table_tensor([f"r{i}" for i in range(len(prompts))], "cpu"), extend_seq_lens=lens)


def test_token_rows_give_each_token_its_position_plus_one_and_its_requests_block_table():
    engine = Engine(ensure_checkpoint("llama"), EngineArgs(max_context=64))
    batch = prefill_batch(engine, [[5, 6], [7, 8, 9]])
    rows, last = token_rows(batch)
    assert (rows.forward_mode, rows.batch_size, rows.seq_lens_cpu, rows.seq_lens.tolist(), last.tolist()) == (
        ForwardMode.DECODE, 5, [1, 2, 1, 2, 3], [1, 2, 1, 2, 3], [1, 4])
    assert rows.block_tables.tolist() == [batch.block_tables[0].tolist()] * 2 + [batch.block_tables[1].tolist()] * 3


def test_token_rows_give_the_logits_of_the_prefill():
    engine = Engine(ensure_checkpoint("llama"), EngineArgs(max_context=64, prefill_graphs=True))
    batch = prefill_batch(engine, [list(range(1, 18)), [3], list(range(40, 73))])
    with torch.no_grad():
        torch.testing.assert_close(engine.model_runner.prefill_graphs.forward_eager(batch),
                                   engine.model_runner.forward_eager(batch), rtol=0, atol=1e-4)


def test_prefill_graphs_is_a_flag_carried_as_json():
    args = build_parser().parse_args(["check", "--prefill-graphs"])
    engine = EngineArgs.from_cli_args(args, mode="graph")
    assert engine == EngineArgs(mode="graph", prefill_graphs=True)
    assert EngineArgs.from_dict(json.loads(json.dumps(engine.as_dict()))) == engine
    assert EngineArgs.from_cli_args(build_parser().parse_args(["check"])).prefill_graphs is False
