"""Scenarios: one model, one mode under test, one parallel layout, one workload."""
from __future__ import annotations

from dataclasses import asdict, dataclass

MODES = ("eager", "graph", "compile")


@dataclass(frozen=True)
class Scenario:
    """`mode` is judged against `reference`: the transformers `oracle`, or the same target's `eager`."""

    model: str
    mode: str
    reference: str
    workload: str = "mixed"
    tp: int = 1
    dp: int = 1
    dtype: str = "float32"
    max_bs: int = 8
    graph_bs: tuple[int, ...] | None = None
    block_size: int = 16
    max_context: int = 256
    max_new_tokens: int = 32
    seed: int = 0
    dp_ranks: tuple[int, ...] | None = None  # the DP rank of each request; None: round robin

    @property
    def name(self) -> str:
        layout = f"-tp{self.tp}" if self.tp > 1 else ""
        layout += f"-dp{self.dp}" if self.dp > 1 else ""
        return f"{self.model}-{self.mode}{layout}-vs-{self.reference}-{self.workload}"

    def as_dict(self) -> dict:
        return {"name": self.name, **asdict(self)}


def default_matrix(models: list[str], modes: list[str], **options) -> list[Scenario]:
    """`eager` against the oracle; every other mode against eager on the same target."""
    scenarios = []
    for model in models:
        for mode in modes:
            reference = "oracle" if mode == "eager" else "eager"
            scenarios.append(Scenario(model=model, mode=mode, reference=reference, **options))
    return scenarios
