"""Device selection and the per-device attention backends, checked on the CPU.

The CUDA decode (`paged_decode_attention`, device-side lengths) is plain torch, so its maths and its
graph property (replay with new lengths and no update) are checked here against the host-list op.
The Ascend backend's FIA call is checked against a CPU stand-in of FIA's documented paged contract.
"""
import dataclasses
import importlib
import sys
import types

import pytest
import torch

from harness.cli import main
from harness.exits import EXIT_USAGE
from harness.inputs.checkpoints import ensure_checkpoint
from harness.inputs.workloads import make_requests
from harness.verdicts.compare import compare_generations
from harness.verdicts.tolerances import Tolerance
from reference_runner import attention
from reference_runner.attention import get_attn_backend
from reference_runner.attention.cuda import CudaAttnBackend
from reference_runner.attention.ops import paged_decode_attention
from reference_runner.attention.torch_native import TorchNativeAttnBackend
from reference_runner.device import npu_available
from reference_runner.engine.args import EngineArgs
from reference_runner.engine.engine import Engine
from reference_runner.engine.forward_batch import ForwardBatch, decode_batch
from reference_runner.engine.kv_cache import KVCache
from reference_runner.errors import GraphTreesUnsupported
from reference_runner.graphs import compiled
from reference_runner.graphs.cpu import sim_backend
from reference_runner.graphs.cuda import inductor
from reference_runner.graphs.runner import GraphRunner
from reference_runner.parallel.state import DIST_BACKENDS
from reference_runner.sim.graph import SimNPUGraph, graph
from suites.faults import FAULTS

HEADS, KV_HEADS, HEAD_DIM, BLOCK, MAX_CONTEXT = 4, 2, 8, 4, 32
SCALE = HEAD_DIM ** -0.5


def paged_attention(query, key_cache, value_cache, table, lens):
    """The CPU op with FIA's host-list contract: the reference every backend must reproduce."""
    return torch.ops.npugraph.paged_attention(
        query, key_cache, value_cache, table, actual_seq_lengths_kv=lens, num_heads=HEADS,
        num_key_value_heads=KV_HEADS, scale=SCALE, block_size=BLOCK)


def decode_batch_of(kv: KVCache, lens: list[int]) -> ForwardBatch:
    """One decode step of token 0 per length in `lens`, its KV blocks reserved in `kv`."""
    return decode_batch(kv, [f"r{i}" for i in range(len(lens))], lens, torch.zeros(len(lens), dtype=torch.int64))


def decode_case(lens, dtype=torch.float32, seed=0):
    """A KV cache full of noise (block 0, the dummy block, NaN) and one decode step per length in `lens`."""
    g = torch.Generator().manual_seed(seed)
    kv = KVCache(num_layers=1, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, num_blocks=24, block_size=BLOCK,
                 max_context=MAX_CONTEXT, dtype=dtype, device="cpu")
    for cache in (*kv.key_caches, *kv.value_caches):
        cache.copy_(torch.randn(cache.shape, generator=g))
        cache[0] = float("nan")
    batch = decode_batch_of(kv, lens)
    q = torch.randn(len(lens), HEADS, HEAD_DIM, generator=g).to(dtype)
    k = torch.randn(len(lens), KV_HEADS, HEAD_DIM, generator=g).to(dtype)
    v = torch.randn(len(lens), KV_HEADS, HEAD_DIM, generator=g).to(dtype)
    return kv, batch, q, k, v


# --- device selection ----------------------------------------------------------------------------

@pytest.mark.skipif(npu_available(), reason="an NPU is present here")
def test_check_on_npu_without_an_npu_exits_2_with_one_line(capsys):
    assert main(["check", "--device", "npu"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("npugraph-harness: error: device 'npu' is not available: torch_npu with CANN")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present here")
def test_check_on_cuda_without_a_gpu_exits_2_with_one_line(capsys):
    assert main(["check", "--device", "cuda"]) == EXIT_USAGE
    assert capsys.readouterr().err == "npugraph-harness: error: device 'cuda' is not available: no CUDA GPU visible to torch\n"


def test_collectives_backend_per_device():
    assert DIST_BACKENDS == {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}


# --- CUDA: device-side lengths -------------------------------------------------------------------

@pytest.mark.parametrize("lens", [[1], [4, 5, 9, 1, 24], [3, 0, 8]], ids=["one", "block-boundaries", "padded-row"])
def test_device_lens_decode_equals_the_host_list_op_on_rows_of_nonzero_length(lens):
    kv, batch, q, _, _ = decode_case([max(n, 1) for n in lens])
    key_cache, value_cache = kv.key_caches[0], kv.value_caches[0]
    table = batch.block_tables.clone()
    table[[i for i, n in enumerate(lens) if n == 0]] = 0  # a padded row reads no live block
    out = paged_decode_attention(q, key_cache, value_cache, table, torch.tensor(lens, dtype=torch.int32), scale=SCALE)
    live = [i for i, n in enumerate(lens) if n > 0]
    torch.testing.assert_close(out[live], paged_attention(q, key_cache, value_cache, table, lens)[live], atol=1e-6, rtol=1e-6)


def test_fia_stand_in_leaves_rows_of_length_0_unspecified_and_the_backend_zeroes_them():
    kv, batch, q, k, v = decode_case([3, 1, 8])
    batch.seq_lens[1], batch.seq_lens_cpu[1] = 0, 0  # a padded row, as the graph runner fills one
    batch.block_tables[1] = 0
    out = TorchNativeAttnBackend(kv, HEADS).forward(q, k, v, 0, batch)  # writes k, v, then attends
    raw = paged_attention(q, kv.key_caches[0], kv.value_caches[0], batch.block_tables, batch.seq_lens_cpu)
    assert raw[1].isnan().all() and not raw[[0, 2]].isnan().any()
    assert out[1].eq(0).all()
    torch.testing.assert_close(out[[0, 2]], raw[[0, 2]])


def test_cuda_backend_decode_equals_the_cpu_backend():
    kv, batch, q, k, v = decode_case([5, 9, 1, 17])
    cpu_out = TorchNativeAttnBackend(kv, HEADS).forward(q, k, v, 0, batch)
    cuda_out = CudaAttnBackend(kv, HEADS).forward(q, k, v, 0, batch)
    torch.testing.assert_close(cuda_out, cpu_out, atol=1e-6, rtol=1e-6)


def test_cuda_is_served_by_the_device_lens_backend():
    kv, *_ = decode_case([1])
    assert type(get_attn_backend("cuda", kv, HEADS)) is CudaAttnBackend


def test_device_lens_decode_replays_new_lengths_without_any_update():
    # Captured as a CUDA graph is (no auto dispatch, so no update() at all), then fed a later step.
    kv, first, q, k, v = decode_case([5, 9, 2], seed=1)
    backend = CudaAttnBackend(kv, HEADS)
    static = {"q": q.clone(), "k": k.clone(), "v": v.clone()}
    g = SimNPUGraph()
    with graph(g, auto_dispatch_capture=False):
        out = backend.forward(static["q"], static["k"], static["v"], 0, first)
    _, later, q2, k2, v2 = decode_case([7, 12, 3], seed=2)
    for name, new in (("q", q2), ("k", k2), ("v", v2)):
        static[name].copy_(new)
    for name in ("positions", "out_cache_loc", "seq_lens", "block_tables"):
        getattr(first, name).copy_(getattr(later, name))
    g.replay()
    # first.seq_lens_cpu still holds the capture-time [5, 9, 2]: the replay must not have read it.
    expected = TorchNativeAttnBackend(kv, HEADS).forward(q2, k2, v2, 0, later)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


@pytest.fixture
def cuda_path_on_the_cpu(monkeypatch):
    """What --device cuda runs, minus CUDA: cuda's attention backend (device lengths) and its runner,
    GraphRunner, which never updates, over the CPU's graphs."""
    monkeypatch.setitem(attention._BACKENDS, "cpu", "reference_runner.attention.cuda:CudaAttnBackend")
    monkeypatch.setattr("reference_runner.graphs.runner.get_graph_backend",
                        lambda device, mode="graph": dataclasses.replace(sim_backend(mode), runner_cls=GraphRunner))


def graph_vs_eager_on_the_cpu() -> tuple[set[str], int]:
    """Verdict statuses of graph mode against eager on `mixed`, and the graph steps."""
    checkpoint = ensure_checkpoint("llama")
    requests = make_requests("mixed", vocab_size=512, max_new_tokens=24)
    eager = Engine(checkpoint, EngineArgs(mode="eager")).generate(requests)
    engine = Engine(checkpoint, EngineArgs(mode="graph"))
    tolerance = Tolerance.for_pair(torch.float32, "cpu", across_kernels=False)
    verdicts = compare_generations(eager, engine.generate(requests), tolerance)
    return {v.status for v in verdicts}, engine.stats.graph_steps


def test_cuda_path_graph_mode_matches_eager_on_the_cpu(cuda_path_on_the_cpu):
    statuses, graph_steps = graph_vs_eager_on_the_cpu()
    assert statuses == {"match"}
    assert graph_steps > 0


def test_cuda_path_with_device_seq_lens_not_refreshed_mismatches_on_the_cpu(cuda_path_on_the_cpu, monkeypatch):
    FAULTS["device_seq_lens_not_refreshed"].inject(monkeypatch)
    statuses, _ = graph_vs_eager_on_the_cpu()
    assert "mismatch" in statuses


def test_cuda_compile_traces_the_step_whole_once_for_every_batch_size_on_the_cpu():
    # fullgraph=True: a graph break would raise here, not on the GPU.
    runner = Engine(ensure_checkpoint("llama"), EngineArgs(mode="eager")).model_runner
    runner.attn_backend = CudaAttnBackend(runner.kv_cache, runner.attn_backend.num_heads)
    step, before = compiled.compile_forward(runner.forward_eager, inductor), compiled.compilations
    for lens in ([5, 9, 3, 7], [6, 40], [17], [4, 5, 6]):
        batch = decode_batch_of(runner.kv_cache, lens)
        compiled.mark_dynamic_batch(batch)  # as the graph runner marks its static batches
        torch.testing.assert_close(step(batch), runner.forward_eager(batch), atol=1e-5, rtol=1e-5)
        for rid in [f"r{i}" for i in range(len(lens))]:
            runner.kv_cache.free(rid)
    assert compiled.compilations - before == 2  # batch sizes 4, 2 and 3 share one; 1 is specialised


# --- npu: the FIA call against a CPU stand-in of FIA's paged contract ----------------------------

def fake_fia(query, key, value, *, block_table, actual_seq_lengths_kv, num_heads, num_key_value_heads,
             input_layout, scale, block_size):
    """FIA's paged decode as documented: BSND query with S = 1, KV [num_blocks, block_size, kv_heads * D],
    int32 block table, host-list lengths; returns (attention_out, softmax_lse)."""
    assert input_layout == "BSND" and query.shape[1] == 1 and query.is_contiguous()
    assert block_table.dtype == torch.int32 and isinstance(actual_seq_lengths_kv, list)
    head_dim = query.shape[-1]
    key_cache = key.view(-1, block_size, num_key_value_heads, head_dim)
    value_cache = value.view(-1, block_size, num_key_value_heads, head_dim)
    out = torch.ops.npugraph.paged_attention(
        query[:, 0], key_cache, value_cache, block_table, actual_seq_lengths_kv=actual_seq_lengths_kv,
        num_heads=num_heads, num_key_value_heads=num_key_value_heads, scale=scale, block_size=block_size)
    return out[:, None], torch.empty(1)


@pytest.fixture
def ascend_backend_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", types.SimpleNamespace(npu_fused_infer_attention_score=fake_fia))
    monkeypatch.delitem(sys.modules, "reference_runner.attention.ascend", raising=False)
    return importlib.import_module("reference_runner.attention.ascend")


def test_ascend_decode_hands_fia_the_paged_cache_and_host_lengths(ascend_backend_module):
    kv, batch, q, k, v = decode_case([5, 9, 1, 17], dtype=torch.bfloat16)
    non_contiguous_q = torch.cat([q, q], dim=1)[:, :HEADS]  # as the model's split of q and k hands it over
    npu_out = ascend_backend_module.AscendAttnBackend(kv, HEADS).forward(non_contiguous_q, k, v, 0, batch)
    assert npu_out.shape == (4, HEADS, HEAD_DIM)
    assert torch.equal(npu_out, TorchNativeAttnBackend(kv, HEADS).forward(q, k, v, 0, batch))


def test_ascend_backend_refuses_float32(ascend_backend_module):
    kv, *_ = decode_case([1])
    with pytest.raises(ValueError, match=r"supports float16 and bfloat16, not torch\.float32: run with --dtype bfloat16"):
        ascend_backend_module.AscendAttnBackend(kv, HEADS)


# --- npu: the graph backend, against a stand-in of torch.npu --------------------------------------

class ExternalEvent:
    """torch.npu.ExternalEvent as update() uses it: recorded on a stream."""

    def __init__(self, log):
        self.log = log

    def record(self, stream):
        self.log.append(("record", stream))


@pytest.fixture
def npu_graphs(monkeypatch):
    """`graphs.npu` imported over a stand-in of `torch.npu`, whose graphs hold dispatch records as torch_npu's do
    (`graph.graph_dispatch_mode.graph_dispatch_records`, each with its ExternalEvent)."""

    class NPUGraph:
        def __init__(self, log, records=2):
            events = [types.SimpleNamespace(event=ExternalEvent(log)) for _ in range(records)]
            self.graph_dispatch_mode = types.SimpleNamespace(graph_dispatch_records=events, update_stream="update stream")

    monkeypatch.setattr(torch, "npu", types.SimpleNamespace(NPUGraph=NPUGraph, Event=object, graph_pool_handle=object),
                        raising=False)
    monkeypatch.setitem(sys.modules, "torch_npu", types.SimpleNamespace(__version__="2.8.0.post2"))
    monkeypatch.delitem(sys.modules, "reference_runner.graphs.npu", raising=False)
    return importlib.import_module("reference_runner.graphs.npu")


def test_npu_task_groups_are_the_graphs_dispatch_records(npu_graphs):
    assert npu_graphs.task_groups(torch.npu.NPUGraph([], records=3)) == 3


def test_npu_backend_names_the_installed_torch_npu_and_its_release_line(npu_graphs):
    assert npu_graphs.npu_backend().release == "torch_npu 2.8.0.post2 (release 7.3)"


def test_npu_unblock_records_every_task_groups_event_on_the_update_stream(npu_graphs):
    log = []
    npu_graphs.record_external_events(torch.npu.NPUGraph(log))
    assert log == [("record", "update stream")] * 2


def test_npu_tree_mode_is_refused_in_one_line_where_torch_npus_trees_would_freeze_fia(npu_graphs):
    with pytest.raises(GraphTreesUnsupported) as refused:
        npu_graphs.npu_backend("tree")
    assert str(refused.value) == (
        "torch_npu 2.8.0.post2 (release 7.3) records NPU graph tree nodes without auto dispatch capture, so FIA's host "
        "list actual_seq_lengths_kv would stay frozen at capture; NPU graph trees update FIA only from torch_npu 2.11.0 "
        "(release 26.1, ACLGraph update plans)")


def test_npu_trees_without_an_update_plan_are_a_refusal_naming_torch_npu(npu_graphs):
    error = RuntimeError("Captured updatable ACLGraph operators but missing ACLGraph update plan: "
                         "['npu_fused_infer_attention_score.out']. This may be caused by ...\nmore")
    assert npu_graphs.update_plan_refusal(error) == (
        "torch_npu 2.8.0.post2 (release 7.3) refuses FIA inside NPU graph trees: Captured updatable ACLGraph operators "
        "but missing ACLGraph update plan: ['npu_fused_infer_attention_score.out']. This may be caused by ...")
    assert npu_graphs.update_plan_refusal(RuntimeError("out of memory")) is None
