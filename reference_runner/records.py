"""The records every engine under test produces; the only part of the runner that verdict code reads."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Request:
    """A prompt to decode greedily; it joins the running batch at decode step `arrival_step`.

    Forcing (what the judge uses to keep comparing past a near-tie): from decode step `forced_from` on,
    the engine feeds `forced_ids` (the tokens of steps `forced_from`..`max_new_tokens - 1`) instead of
    its own choice, and still records its own top-k logprobs at every step. `forced_experts` replays MoE
    routing: per fed position (prompt, then every output token but the last), per MoE layer, the
    top-k expert ids to compute with instead of the router's; the router's own choice is still recorded.
    """

    rid: str
    prompt_ids: list[int]
    max_new_tokens: int
    arrival_step: int = 0
    forced_from: int | None = None
    forced_ids: list[int] = field(default_factory=list)
    forced_experts: list[list[list[int]]] = field(default_factory=list)


@dataclass
class Generation:
    """What an engine produced for one request: one entry per generated token in every list.

    `output_ids[i]` is the token of step i: the engine's own choice, or from step `forced_from` on the
    token it was made to feed. `top_logprobs[i]` holds the engine's own top-k `(token_id, logprob)` pairs
    of step i, best first. `graph_steps[i]` says whether step i's forward replayed a device graph (step 0,
    the prefill, only with prefill graphs). MoE models also record, per step, the positions its forward fed (the whole prompt at
    step 0, then one token), and for each position and MoE layer the router's own top-k expert ids
    (`routed_experts[i][position][layer]`) and the router logit gap between its k-th and (k+1)-th expert
    (`router_gaps[i][position][layer]`); both stay empty for dense models and engines that do not report them.
    """

    rid: str
    output_ids: list[int] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    graph_steps: list[bool] = field(default_factory=list)
    error: str | None = None  # set when the request was rejected; the rest of the batch still runs
    forced_from: int | None = None
    routed_experts: list[list[list[list[int]]]] = field(default_factory=list)
    router_gaps: list[list[list[float]]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict) -> Generation:
        """The inverse of `dataclasses.asdict` (after a JSON round trip, which turns tuples into lists)."""
        return cls(**{**d, "top_logprobs": [[tuple(pair) for pair in step] for step in d["top_logprobs"]]})

    def append(self, token: int, top: list[tuple[int, float]], in_graph: bool) -> None:
        self.output_ids.append(token)
        self.top_logprobs.append(top)
        self.graph_steps.append(in_graph)

    def chose(self, step: int) -> bool:
        """Whether the token of `step` is the engine's own choice, not a forced one."""
        return self.forced_from is None or step < self.forced_from
