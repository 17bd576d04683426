"""Dynamic-shape request mixes: every shape around a captured graph moves from one step to the next.

A mix staggers arrivals and finishes, so the decode batch crosses capture-size boundaries between
steps (and may exceed `max_bs`); prompts span one to all KV blocks of `max_context`; some requests
grow to exactly `max_context`, so their block tables fill up to the last column. `sample_mix` draws
one from a seed; the property suite draws them with hypothesis, which shrinks a failing mix.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from reference_runner.records import Request


@dataclass(frozen=True)
class MixLimits:
    """The engine shape a mix is drawn for."""

    max_context: int = 64
    max_requests: int = 10  # above max_bs, so some steps fall back to eager
    max_new_tokens: int = 12
    max_arrival: int = 8


@dataclass(frozen=True)
class RequestShape:
    """One request of a mix: its prompt length, tokens to generate and arrival step."""

    prompt_len: int
    new_tokens: int
    arrival: int

    def __repr__(self) -> str:
        return f"{self.prompt_len}+{self.new_tokens}@{self.arrival}"


@dataclass(frozen=True)
class Mix:
    """Request shapes, printed compactly as `prompt_len+new_tokens@arrival_step`."""

    shapes: tuple[RequestShape, ...]

    def requests(self, vocab_size: int, seed: int = 0) -> list[Request]:
        """The mix as requests with seeded prompt tokens; request i is `d{i}`."""
        rng = random.Random(seed)
        return [Request(f"d{i}", [rng.randrange(vocab_size) for _ in range(s.prompt_len)], s.new_tokens, s.arrival)
                for i, s in enumerate(self.shapes)]

    def __repr__(self) -> str:
        return f"Mix([{', '.join(map(repr, self.shapes))}])"


def request_shape(prompt_len: int, new_tokens: int, arrival: int, to_the_end: bool, limits: MixLimits) -> RequestShape:
    """Clamp drawn numbers into a valid shape; `to_the_end` makes the request end at exactly `max_context`."""
    prompt_len = min(prompt_len, limits.max_context - 1)
    new_tokens = min(new_tokens, limits.max_context - prompt_len)
    if to_the_end:
        prompt_len = limits.max_context - new_tokens
    return RequestShape(prompt_len, new_tokens, arrival)


def sample_mix(seed: int, limits: MixLimits = MixLimits()) -> Mix:
    """A seeded mix of 1..max_requests requests; about one in three grows to `max_context`."""
    rng = random.Random(seed)
    return Mix(tuple(
        request_shape(rng.randint(1, limits.max_context - 1), rng.randint(1, limits.max_new_tokens),
                      rng.randint(0, limits.max_arrival), rng.random() < 1 / 3, limits)
        for _ in range(rng.randint(1, limits.max_requests))
    ))
