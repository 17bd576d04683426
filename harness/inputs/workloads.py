"""Request mixes: seeded, so every run of a scenario decodes the same prompts."""
from __future__ import annotations

import random
from collections.abc import Callable

from reference_runner.records import Request


def mixed(vocab_size: int, max_new_tokens: int, seed: int = 0) -> list[Request]:
    """Eight requests: prompts of 1 to 40 tokens (crossing 16-token blocks), staggered arrivals and
    finishes, so the decode batch moves through 1..8 rows, on and off the captured sizes."""
    rng = random.Random(seed)
    prompt_lens = [5, 17, 1, 33, 9, 16, 40, 3]
    arrivals = [0, 0, 1, 2, 2, 4, 7, 9]
    new_tokens = [max_new_tokens, max_new_tokens - 7, max_new_tokens, max_new_tokens - 13,
                  max_new_tokens, max_new_tokens - 3, max_new_tokens - 11, max_new_tokens - 5]
    return [
        Request(f"r{i}", [rng.randrange(vocab_size) for _ in range(n)], max(1, m), arrival)
        for i, (n, arrival, m) in enumerate(zip(prompt_lens, arrivals, new_tokens))
    ]


def batch(size: int) -> Callable[[int, int, int], list[Request]]:
    """`size` requests arriving together (sizes off the captured ones: 3, 5, 7, 13...); a third stop
    at 1/2 and a third at 3/4 of `max_new_tokens`, so the batch then shrinks across sizes."""

    def make(vocab_size: int, max_new_tokens: int, seed: int = 0) -> list[Request]:
        rng = random.Random(seed * 1000 + size)
        return [
            Request(f"b{i}", [rng.randrange(vocab_size) for _ in range(rng.randint(1, 24))],
                    max(1, max_new_tokens - (i % 3) * max_new_tokens // 4))
            for i in range(size)
        ]

    return make


def join_leave(vocab_size: int, max_new_tokens: int, seed: int = 0) -> list[Request]:
    """Requests join and finish every few steps, so consecutive decode steps change batch size."""
    rng = random.Random(seed + 7)
    return [
        Request(f"j{i}", [rng.randrange(vocab_size) for _ in range(rng.randint(2, 30))],
                max(1, max_new_tokens - 5 * (i % 4)), arrival_step=3 * i)
        for i in range(10)
    ]


def skewed(vocab_size: int, max_new_tokens: int, seed: int = 0) -> list[Request]:
    """Five requests from step 0, and a sixth arriving at step 6 that stops after 4 tokens: split 5:1
    over two DP ranks (`dp_ranks=(0, 0, 0, 0, 0, 1)`), rank 1 idles before and after its one request."""
    rng = random.Random(seed + 11)
    prompts = [[rng.randrange(vocab_size) for _ in range(rng.randint(2, 30))] for _ in range(6)]
    return [
        *(Request(f"s{i}", prompts[i], max_new_tokens - 2 * i) for i in range(5)),
        Request("s5", prompts[5], min(4, max_new_tokens), arrival_step=6),
    ]


WORKLOADS: dict[str, Callable[..., list[Request]]] = {
    "mixed": mixed,
    "join_leave": join_leave,
    "skewed": skewed,
    **{f"batch{n}": batch(n) for n in (1, 3, 5, 7, 8, 13)},
}


def make_requests(workload: str, vocab_size: int, max_new_tokens: int, seed: int = 0) -> list[Request]:
    """The requests of a named workload."""
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; known: {', '.join(WORKLOADS)}")
    return WORKLOADS[workload](vocab_size, max_new_tokens, seed)
