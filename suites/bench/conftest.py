"""Shared engines and the timing fixture of the throughput benchmarks.

Engine construction (loading, graph capture, compilation) stays out of the timed part: one engine
per (model, mode), built with `max_bs=32` so that its graphs cover every benchmarked batch size.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch

from harness.inputs.checkpoints import ensure_checkpoint
from reference_runner.attention import default_dtype
from reference_runner.device import synchronize
from reference_runner.engine.args import EngineArgs
from reference_runner.engine.engine import Engine
from reference_runner.engine.forward_batch import decode_batch
from reference_runner.graphs.runner import GraphRunner

MAX_BS = 32
MAX_CONTEXT = 64  # the benchmarks' 16-token prompts + 32 new tokens, in whole 16-token KV blocks
PROMPT_LEN = 16
# (warm-up rounds, rounds) of one call each: a step takes ~1 ms, a 32-token loop ~50 ms. The decode step's speed-ups
# are gated: over 1000 rounds their fastest rounds moved less between runs of one tree than over 200, under load
# (at most 18% against 29%: README, "The ratio gate").
PEDANTIC = {"step": (10, 1000), "loop": (1, 20)}


@pytest.fixture(scope="session", autouse=True)
def planted_replay_slowdown(pytestconfig) -> Iterator[int]:
    """`--plant-replay-slowdown N`: every graph replay runs N times over, as a regression of the replay path would
    (a replay is idempotent: the same static inputs give the same logits and KV writes). The ratio gate must fail."""
    times = pytestconfig.getoption("plant_replay_slowdown")
    with pytest.MonkeyPatch.context() as patch:
        if times > 1:
            replay = GraphRunner.replay

            def slowed(self, forward_batch):
                for _ in range(times - 1):
                    replay(self, forward_batch)
                return replay(self, forward_batch)

            patch.setattr(GraphRunner, "replay", slowed)
        yield times


@pytest.fixture(scope="session")
def dtype(device) -> torch.dtype:
    return getattr(torch, default_dtype(device))


@pytest.fixture(scope="session")
def engines(device) -> Callable[[str, str], Engine]:
    """`engines(model, mode)`: one engine per model and mode for the whole session."""
    cache: dict[tuple[str, str], Engine] = {}

    def get(model: str, mode: str) -> Engine:
        if (model, mode) not in cache:
            args = EngineArgs(mode=mode, dtype=default_dtype(device), max_bs=MAX_BS, max_context=MAX_CONTEXT)
            cache[model, mode] = Engine(ensure_checkpoint(model), args, device=device)
        return cache[model, mode]

    return get


def prompts(bs: int, vocab_size: int) -> list[list[int]]:
    """`bs` different seeded prompts of `PROMPT_LEN` tokens."""
    generator = torch.Generator().manual_seed(bs)
    return torch.randint(3, vocab_size, (bs, PROMPT_LEN), generator=generator).tolist()


@pytest.fixture(scope="session")
def bench_prompts() -> Callable[[int, int], list[list[int]]]:
    """`bench_prompts(bs, vocab_size)`: the seeded prompts every benchmark of batch size `bs` decodes."""
    return prompts


@pytest.fixture(scope="session")
def decode_step():
    """`decode_step(engine, bs, prefix)`: a context giving one decode step of `bs` requests, each writing
    token `PROMPT_LEN` after a `PROMPT_LEN`-token context; their KV blocks are freed on exit."""

    @contextmanager
    def step(engine: Engine, bs: int, prefix: str) -> Iterator[Callable[[], tuple[torch.Tensor, bool]]]:
        rids = [f"{prefix}{i}" for i in range(bs)]
        last = [row[-1] for row in prompts(bs, engine.model_runner.vocab_size)]
        batch = decode_batch(engine.kv_cache, rids, [PROMPT_LEN + 1] * bs, torch.tensor(last, device=engine.device))
        try:
            yield lambda: engine.model_runner.forward(batch)
        finally:
            for rid in rids:
                engine.kv_cache.free(rid)

    return step


@pytest.fixture(scope="session")
def hf_models(device, dtype) -> Callable[[str], torch.nn.Module]:
    """`hf_models(model)`: the Hugging Face model of the same checkpoint, the peer of the loop benchmark."""
    from transformers import AutoModelForCausalLM

    cache: dict[str, torch.nn.Module] = {}

    def get(model: str) -> torch.nn.Module:
        if model not in cache:
            cache[model] = AutoModelForCausalLM.from_pretrained(ensure_checkpoint(model), dtype=dtype).to(device).eval()
        return cache[model]

    return get


@pytest.fixture
def measure(benchmark, device):
    """Time `fn` with `benchmark.pedantic`; `extra_info` gets what ran, tokens/s and the speed-up over `eager`.

    `eager` (the same workload on the eager engine) runs before every round, in pedantic's untimed
    setup, so both see the same load: their ratio holds on a shared machine where the absolute
    times of two consecutive benchmarks do not. The speed-up is the ratio of the fastest rounds,
    since load only ever adds time. Not of the medians, nor the median of each round's ratio: a round
    that loses the core loses a time slice, and the longer eager round loses it more often, so under
    load those grew with the load (over 10 runs the compiled llama step read 4.4-5.1x at the fastest rounds,
    5.2-17x at the medians).
    """

    def run(fn: Callable[[], object], *, eager: Callable[[], object] | None, model: str, kind: str, mode: str,
            bs: int, tokens: int) -> None:
        eager_times = []

        def timed():
            fn()
            synchronize(device)  # device work queued by fn is part of its time

        def setup():
            if eager is not None:
                start = time.perf_counter()
                eager()
                synchronize(device)
                eager_times.append(time.perf_counter() - start)

        warmup_rounds, rounds = PEDANTIC[kind]
        benchmark.group = f"{model} {kind} bs={bs}"
        benchmark.extra_info.update(model=model, kind=kind, mode=mode, bs=bs, tokens=tokens)
        with torch.no_grad():
            benchmark.pedantic(timed, setup=setup, warmup_rounds=warmup_rounds, rounds=rounds)
        stats = benchmark.stats.stats
        benchmark.extra_info.update(tokens_per_s=round(tokens / stats.median, 1),
                                    speedup_vs_eager=round(min(eager_times) / stats.min, 3) if eager else 1.0)

    return run
