"""The records every engine under test produces; the only part of the runner that verdict code reads."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Request:
    """A prompt to decode greedily; it joins the running batch at decode step `arrival_step`."""

    rid: str
    prompt_ids: list[int]
    max_new_tokens: int
    arrival_step: int = 0


@dataclass
class Generation:
    """What an engine produced for one request: one entry per generated token in every list.

    `top_logprobs[i]` holds the top-k `(token_id, logprob)` pairs of step i, best first.
    `graph_steps[i]` says whether step i's forward replayed a device graph (step 0, the prefill, only with prefill graphs).
    """

    rid: str
    output_ids: list[int] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    graph_steps: list[bool] = field(default_factory=list)
    error: str | None = None  # set when the request was rejected; the rest of the batch still runs

    def append(self, token: int, top: list[tuple[int, float]], in_graph: bool) -> None:
        self.output_ids.append(token)
        self.top_logprobs.append(top)
        self.graph_steps.append(in_graph)
