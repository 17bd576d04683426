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


WORKLOADS: dict[str, Callable[..., list[Request]]] = {
    "mixed": mixed,
    "join_leave": join_leave,
    **{f"batch{n}": batch(n) for n in (1, 3, 5, 7, 8, 13)},
}


def make_requests(workload: str, vocab_size: int, max_new_tokens: int, seed: int = 0) -> list[Request]:
    """The requests of a named workload."""
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; known: {', '.join(WORKLOADS)}")
    return WORKLOADS[workload](vocab_size, max_new_tokens, seed)
