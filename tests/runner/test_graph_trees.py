"""Mode tree's runner (`graphs/tree.py`) against a stand-in of torch's graph-tree manager: the CPU has no graph
trees, so what is tested here is the runner's side: static marking, and that every step which did not replay a
recorded graph (a warm-up, a re-recording, a skip) is counted with its reason, never silently."""
import dataclasses
import logging
from collections import Counter
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch

from harness.inputs.checkpoints import ensure_checkpoint
from harness.inputs.workloads import make_requests
from harness.verdicts.compare import compare_generations
from harness.verdicts.tolerances import Tolerance
from reference_runner.engine.args import EngineArgs
from reference_runner.engine.engine import Engine
from reference_runner.errors import GraphTreesUnsupported
from reference_runner.graphs.cpu import sim_backend
from reference_runner.graphs.tree import SKIP_LOGGER, GraphTreeRunner, GraphTrees, compile_into_trees
from reference_runner.records import Request

MUTATED = "skipping cudagraphs due to mutated inputs (2 instances). Found from : \n  File ..."


class StandInTrees:
    """Takes torch's manager paths as its trees do for a new function (a warm-up, a recording, then replays), unless a
    test queues another path for the next call: "record" (a re-recording), "warm-up", "skip" (an eager fallback,
    logged and counted as torch's `log_cudagraph_skip_and_bump_counter` does; the size then stays skipped, run
    eagerly with no path) or "outside" (eager, no log: past a limit)."""

    def __init__(self) -> None:
        self.calls: Counter = Counter()
        self.queued: list[str] = []
        self.skipped: set[int] = set()
        self.skips = 0
        self.cuda_graphs_thread_pool = None

    def execute_node(self, forward, batch):
        return forward(batch)

    record_function = run_eager = execute_node

    def compile(self, forward):
        def run(batch):
            bs = batch.batch_size
            self.calls[bs] += 1
            path = self.queued.pop(0) if self.queued else {1: "warm-up", 2: "record"}.get(self.calls[bs], "replay")
            if bs in self.skipped or path == "outside":
                return forward(batch)
            if path == "skip":
                self.skipped.add(bs)
                self.skips += 1
                logging.getLogger(SKIP_LOGGER).warning(MUTATED)
                return forward(batch)
            method = {"replay": "execute_node", "record": "record_function", "warm-up": "run_eager"}[path]
            return getattr(self, method)(forward, batch)

        return run

    def trees(self) -> GraphTrees:
        return GraphTrees(name="stand-in trees", compile=self.compile, manager=lambda: self,
                          mark_step_begin=lambda: None, pool_attribute="cuda_graphs_thread_pool",
                          skip_count=lambda: self.skips, refusal=refusal)


def refusal(error: BaseException) -> str | None:
    return "no update plan" if "ACLGraph update plan" in str(error) else None


@pytest.fixture
def stand_in(monkeypatch) -> StandInTrees:
    """Mode tree on the CPU, over the stand-in trees (the runner's graphs: none, the trees capture)."""
    trees = StandInTrees()
    monkeypatch.setattr("reference_runner.graphs.runner.get_graph_backend",
                        lambda device, mode="graph": dataclasses.replace(sim_backend(), runner_cls=GraphTreeRunner,
                                                                         trees=trees.trees()))
    return trees


def three_requests(new_tokens: int) -> list[Request]:
    """Three requests decoding together: every decode step a batch of 3, padded to the graph of 4."""
    return [Request(f"t{i}", [1, 2, 3, 4, 5], new_tokens) for i in range(3)]


def tree_engine(**args) -> Engine:
    return Engine(ensure_checkpoint("llama"), EngineArgs(mode="tree", max_context=64, **args))


def test_steps_the_trees_replay_are_graph_steps_and_match_eager(stand_in):
    requests = make_requests("mixed", 512, 8)
    eager = Engine(ensure_checkpoint("llama"), EngineArgs(max_context=64))
    engine = tree_engine()
    verdicts = compare_generations(eager.generate(requests), engine.generate(requests),
                                   Tolerance.for_pair(torch.float32, "cpu", across_kernels=True))  # inductor's kernels
    assert {v.status for v in verdicts} == {"match"}
    assert (engine.stats.graph_steps, engine.stats.eager_steps, engine.stats.fallback_reasons) == (
        eager.stats.eager_steps, 0, Counter())


@pytest.mark.parametrize(("path", "reason"), [
    ("record", "graph bs=4: re-recorded by the stand-in trees (a static input moved or an output is still alive)"),
    ("skip", "graph bs=4: stand-in trees skipped it, run eagerly (skipping cudagraphs due to mutated inputs "
             "(2 instances). Found from : )"),
    ("outside", "graph bs=4: run eagerly outside the stand-in trees (skipped, past a re-record or recompile limit)"),
    ("warm-up", "graph bs=4: stand-in trees ran a warm-up, not a replay"),
], ids=["re-record", "skip", "outside", "warm-up"])
def test_a_step_the_trees_did_not_replay_is_an_eager_step_with_its_reason(stand_in, path, reason):
    engine = tree_engine()
    stand_in.queued = ["replay", path]  # the first decode step replays, the second does not
    engine.generate(three_requests(new_tokens=3))
    assert (engine.stats.graph_steps, engine.stats.eager_steps) == (1, 1)
    assert engine.stats.fallback_reasons == {reason: 1}


def test_a_kv_cache_reallocated_is_named_as_the_re_recordings_reason(stand_in):
    engine = tree_engine()
    engine.kv_cache.allocate()
    stand_in.queued = ["record"]
    engine.generate(three_requests(new_tokens=2))
    runner = engine.model_runner.graph_runner
    assert engine.stats.fallback_reasons == {
        "graph bs=4: re-recorded by the stand-in trees (the KV cache was reallocated)": 1}
    assert (runner.recaptures, runner.captured_on) == (1, engine.kv_cache.data_ptrs())


def test_a_size_the_trees_never_replay_at_capture_names_its_skip_on_every_step(stand_in):
    stand_in.queued = ["skip"]  # the first call of bs=8, the first size captured
    engine = tree_engine()
    engine.generate(make_requests("batch7", 512, 3))
    reason = ("graph bs=8: stand-in trees skipped it, run eagerly (skipping cudagraphs due to mutated inputs "
              "(2 instances). Found from : )")
    assert engine.model_runner.graph_runner.skipped == {8: reason}
    assert engine.stats.fallback_reasons[reason] == engine.stats.eager_steps > 0


def test_the_kv_cache_and_the_static_buffers_are_marked_static_unguarded(stand_in):
    engine = tree_engine()
    runner, kv = engine.model_runner.graph_runner, engine.kv_cache
    marked = [*kv.key_caches, *kv.value_caches, runner.batches[8].input_ids,
              runner.batches[1].block_tables]
    assert {getattr(t, "_dynamo_static_input_type", None) for t in marked} == {"unguarded"}


def test_prefill_runs_through_the_trees_as_its_own_family(stand_in):
    engine = tree_engine(prefill_graphs=True)
    engine.generate(make_requests("mixed", 512, 4))
    assert [f.name for f in engine.graph_families] == ["prefill graph tokens", "graph bs"]
    assert (engine.stats.prefill_graph_steps, engine.stats.prefill_eager_steps) == (6, 0)


def test_trees_that_refuse_the_step_are_a_one_line_setup_error(stand_in, monkeypatch):
    def refuse(forward):
        def run(batch):
            raise RuntimeError("Captured updatable ACLGraph operators but missing ACLGraph update plan: [FIA]")

        return run

    monkeypatch.setattr(stand_in, "compile", refuse)
    with pytest.raises(GraphTreesUnsupported, match=r"^mode 'tree' on cpu: no update plan$"):
        tree_engine()


def test_the_compiled_step_takes_no_two_inputs_sharing_memory(monkeypatch):
    # AOT autograd merges mutated inputs that alias (a KV pool and a view of it) into one synthetic base, which graph
    # trees do not count as static: on CUDA they skipped every step for "mutated inputs". Dynamo's inputs show it.
    storages: list[list[int]] = []

    def backend(gm, example_inputs):
        storages.append([t.untyped_storage().data_ptr() for t in example_inputs if isinstance(t, torch.Tensor)])
        return gm.forward

    trees = GraphTrees(name="dynamo inputs", compile=lambda forward: compile_into_trees(forward, backend=backend),
                       manager=lambda: None, mark_step_begin=lambda: None, pool_attribute="pool", skip_count=lambda: 0)
    monkeypatch.setattr("reference_runner.graphs.runner.get_graph_backend",
                        lambda device, mode="graph": dataclasses.replace(sim_backend(), runner_cls=GraphTreeRunner,
                                                                         trees=trees))
    tree_engine(graph_bs=(1,))
    assert storages and all(len(inputs) == len(set(inputs)) for inputs in storages)


@pytest.fixture
def inductor_verdicts(monkeypatch) -> Iterator[list[str | None]]:
    """Mode tree on the CPU through the real `torch.compile(mode="reduce-overhead")`, up to the point where inductor
    hands each compiled step to the graph trees: what the trees would decide at its first recording (a skip's
    reason, or None: recorded), from torch's own checks. The CPU lowering's own refusal ("cpu device") is lifted."""
    from torch._inductor import cudagraph_utils, output_code
    from torch._inductor.utils import remove_unaligned_input_idxs

    verdicts: list[str | None] = []

    def defer_to_first_call(example_inputs, compiled_graph, cudagraphs, *rest):
        model, info = compiled_graph.current_callable, compiled_graph.cudagraph_info

        def first_call(inputs):  # as the trees do: their checks need the real inputs, not the fake ones
            static = remove_unaligned_input_idxs(inputs, compiled_graph.fx_kwargs["static_input_idxs"] or ())
            func = SimpleNamespace(mutated_input_idxs=compiled_graph.mutated_input_idxs, static_input_idxs=static,
                                   placeholders=info.placeholders)
            mutation = cudagraph_utils.check_for_mutation(func, inputs, lambda t: False)
            verdicts.append(mutation or (f"skipping cudagraphs due to {info.cudagraph_fail_reasons}"
                                         if info.cudagraph_fail_reasons else None))
            compiled_graph.current_callable = model
            return model(inputs)

        compiled_graph.current_callable = first_call

    monkeypatch.setattr(cudagraph_utils, "check_lowering_disable_cudagraph", lambda device_node_mapping: None)
    monkeypatch.setattr(output_code, "cudagraph_post_compile", defer_to_first_call)
    monkeypatch.setattr(output_code, "cudagraph_partition_post_compile", defer_to_first_call)
    trees = GraphTrees(name="inductor", compile=lambda forward: compile_into_trees(forward, mode="reduce-overhead"),
                       manager=lambda: None, mark_step_begin=lambda: None, pool_attribute="pool", skip_count=lambda: 0)
    monkeypatch.setattr("reference_runner.graphs.runner.get_graph_backend",
                        lambda device, mode="graph": dataclasses.replace(sim_backend(), runner_cls=GraphTreeRunner,
                                                                         trees=trees))
    # Cached compiles on the CPU were refused at lowering and carry no checks; dynamo's own entries too (their
    # guards do not see what was marked static, unguarded).
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        yield verdicts
    torch._dynamo.reset()  # no entry compiled under these patches outlives the test


@pytest.mark.parametrize(("model", "prefill_graphs"), [("llama", False), ("qwen2_moe", True)])
def test_inductor_hands_the_trees_every_step_as_recordable(inductor_verdicts, model, prefill_graphs):
    # On the H200, the trees skipped every step for "mutated inputs" until the KV pools stopped sharing memory with
    # another input: this is the check that skipped them, run on the CPU.
    Engine(ensure_checkpoint(model), EngineArgs(mode="tree", max_context=16, graph_bs=(1,),
                                                prefill_graphs=prefill_graphs))
    assert inductor_verdicts == [None] * (2 if prefill_graphs else 1)  # one decode size, one prefill bucket


def test_a_step_writing_an_input_not_marked_static_is_one_the_trees_skip(inductor_verdicts, monkeypatch):
    monkeypatch.setattr(GraphTreeRunner, "mark_static", lambda self: None)
    Engine(ensure_checkpoint("llama"), EngineArgs(mode="tree", max_context=16, graph_bs=(1,)))
    assert [v.split(".")[0] if v else v for v in inductor_verdicts] == [
        "skipping cudagraphs due to mutated inputs (4 instances)"]  # the two layers' key and value pools
