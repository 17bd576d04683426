"""Scenarios: one model, one engine configuration under test (mode, layout, dtype...), one workload."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from reference_runner.engine.args import EngineArgs

# The same-kernel twin of a graph mode: its compiled step without graphs. Where a target runs it and `--modes` names it
# (`--modes compile,compile_nograph`), the graph mode is judged against the twin as tightly as graph against eager,
# and the twin against eager across kernels: the graph's own faults are judged exactly, the compiler's noise apart.
# Named, not implied: on the CPU the twin records every step anew, which costs about twice compile mode's run.
TWINS = {"compile": "compile_nograph"}


@dataclass(frozen=True)
class Scenario:
    """`engine` (its mode above all) is judged against `baseline`: the transformers `oracle`, the same target run
    `eager` on one rank, or in its mode's twin (`compile_nograph`) on one rank, or another target (named: `vllm`,
    `reference`...) run eager on one rank."""

    model: str
    baseline: str
    engine: EngineArgs = field(default_factory=EngineArgs)
    workload: str = "mixed"
    max_new_tokens: int = 32
    seed: int = 0
    dp_ranks: tuple[int, ...] | None = None  # the DP rank of each request; None: round robin

    @property
    def mode(self) -> str:
        return self.engine.mode

    @property
    def name(self) -> str:
        layout = f"-tp{self.engine.tp_size}" if self.engine.tp_size > 1 else ""
        layout += f"-dp{self.engine.dp_size}" if self.engine.dp_size > 1 else ""
        prefill = "+prefill" if self.engine.prefill_graphs else ""
        return f"{self.model}-{self.mode}{prefill}{layout}-vs-{self.baseline}-{self.workload}"

    def baseline_engine(self) -> EngineArgs:
        """The engine the baseline runs on one rank: this one in the twin mode the baseline names, else eager."""
        mode = self.baseline if self.baseline in TWINS.values() else "eager"
        return dataclasses.replace(self.engine, mode=mode, tp_size=1, dp_size=1)

    def as_dict(self) -> dict:
        """Flat: the scenario's fields, then its engine's."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "engine"}
        return {"name": self.name, **fields, **self.engine.as_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> Scenario:
        """The inverse of `as_dict` (after a JSON round trip); other keys of `d` are ignored."""
        engine = EngineArgs.from_dict({f.name: d[f.name] for f in dataclasses.fields(EngineArgs)})
        fields = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name != "engine"}
        dp_ranks = fields["dp_ranks"]
        return cls(**{**fields, "dp_ranks": tuple(dp_ranks) if dp_ranks is not None else None}, engine=engine)


def default_matrix(models: list[str], modes: list[str], engine: EngineArgs, against: Sequence[str] = (),
                   twins: Mapping[str, str] = MappingProxyType({}), **options) -> list[Scenario]:
    """`eager` against the oracle; every other mode against eager on the same target, but a mode whose twin the target
    runs (`twins`, of `TWINS`) and `modes` name too: that mode against its twin, after the twin against eager. With
    `against` (targets' names), every mode against each of those targets' eager runs instead."""
    if against:
        return [Scenario(model, baseline, dataclasses.replace(engine, mode=mode), **options)
                for model in models for baseline in against for mode in modes]
    pairs: dict[tuple[str, str], None] = {}  # (mode, baseline), in order, once each
    for mode in modes:
        twin = twins.get(mode) if twins.get(mode) in modes else None
        if twin is not None:
            pairs[twin, "eager"] = None
        pairs[mode, twin or ("oracle" if mode == "eager" else "eager")] = None
    return [Scenario(model, baseline, dataclasses.replace(engine, mode=mode), **options)
            for model in models for mode, baseline in pairs]
