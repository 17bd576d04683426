"""The compiled decode step beats plain graph replay (and eager) at bs=1 and bs=8.

The compiled step is timed by `benchmark.pedantic`; graph replay and eager run the same step in
pedantic's untimed setup before every round, so all three see the same load, and the speed-ups are
ratios of the fastest rounds (load only ever adds time).
"""
import time

import pytest
import torch

from reference_runner.device import synchronize


@pytest.mark.parametrize("bs", [1, 8])
@pytest.mark.parametrize("model", ["llama", "qwen2_moe"])
def test_compiled_step_beats_graph_replay(benchmark, engines, decode_step, device, model, bs):
    with (decode_step(engines(model, "compile"), bs, "c") as compiled,
          decode_step(engines(model, "graph"), bs, "g") as graph,
          decode_step(engines(model, "eager"), bs, "e") as eager, torch.no_grad()):
        assert compiled()[1] and graph()[1]  # both replay a graph, not an eager fallback
        peers = {"graph": (graph, []), "eager": (eager, [])}

        def setup():
            for step, times in peers.values():
                start = time.perf_counter()
                step()
                synchronize(device)
                times.append(time.perf_counter() - start)

        def timed():
            compiled()
            synchronize(device)

        benchmark.group = f"{model} compiled step bs={bs}"
        benchmark.pedantic(timed, setup=setup, warmup_rounds=10, rounds=200)
    fastest = benchmark.stats.stats.min
    speedups = {f"speedup_vs_{mode}": round(min(times) / fastest, 2) for mode, (_, times) in peers.items()}
    benchmark.extra_info.update(model=model, bs=bs, compile_us=round(fastest * 1e6, 1),
                                **{f"{mode}_us": round(min(times) * 1e6, 1) for mode, (_, times) in peers.items()},
                                **speedups)
    assert speedups["speedup_vs_graph"] > 1
