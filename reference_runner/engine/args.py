"""EngineArgs: every option of the engine under test, declared once.

Scenarios carry one, rank jobs ship one as JSON, and the command lines (`npugraph-harness check`,
the rank worker) build their flags from these fields, as SGLang's `ServerArgs` does: an option is
added by adding a field here. Torch-free, so that `--help` answers at once.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

# `compile_nograph`: compile mode's compiled step run on each batch as it comes, without device graphs (the same-kernel
# twin compile is judged against, `harness/inputs/scenarios.py`).
MODES = ("eager", "graph", "compile", "tree", "compile_nograph")
GRAPH_MODES = ("graph", "compile", "tree")  # the modes whose decode steps replay device graphs
DTYPES = ("float32", "bfloat16", "float16")


def _option(default: Any, help: str, flag: str | None = None, **argparse_kwargs: Any) -> Any:
    return field(default=default, metadata={"help": help, "flag": flag, **argparse_kwargs})


def csv_items(value: str) -> list[str]:
    """The items of a comma-separated option value. An empty item (`''`, `,`, `a,`) is an error, never dropped:
    dropping it could leave a list that checks nothing."""
    items = [item.strip() for item in value.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"empty item in {value!r}")
    return items


def _int_list(value: str) -> tuple[int, ...]:
    items = csv_items(value)
    try:
        sizes = tuple(int(item) for item in items)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
    return sizes


@dataclass(frozen=True)
class EngineArgs:
    """How the engine under test runs: decode mode, precision, graph sizes, KV cache, layout."""

    mode: str = _option("eager", "decode mode", choices=MODES)
    dtype: str = _option("float32", "model and KV cache dtype (the CLI default: float32, bfloat16 on npu)", choices=DTYPES)
    max_bs: int = _option(8, "largest captured batch; larger batches run eager")
    graph_bs: tuple[int, ...] | None = _option(None, "capture sizes, e.g. 1,2,4,8 (default: 1, 2, 4, 8, then every 8 "
                                                     "up to --max-bs)", type=_int_list)
    block_size: int = _option(16, "tokens per KV-cache block")
    max_context: int = _option(256, "longest sequence (prompt + generated tokens) a request may reach")
    num_blocks: int | None = _option(None, "KV-cache blocks (default: room for 2 x max-bs requests of max-context)",
                                     type=int)
    # 20, vLLM's default ceiling: in bfloat16 a flat step can tie at the 5th rank, and a near-tie chosen by one side
    # then falls out of the other's top-5 (a false mismatch, seen on llama_hd32 compiled against eager).
    top_k: int = _option(20, "logprobs recorded per step")
    tp_size: int = _option(1, "tensor-parallel ranks", flag="--tp")
    dp_size: int = _option(1, "data-parallel ranks (DP attention for MoE)", flag="--dp")
    prefill_graphs: bool = _option(False, "capture prefill too, per token bucket, in the decode graphs' pool (prefill runs "
                                          "as one paged-attention row per token, eager or replayed)", action="store_true")
    replay_timeout_s: float = _option(60.0, "seconds a graph replay may take before it is failed as a hang (a replay "
                                            "whose task groups were not updated waits forever on an NPU)",
                                      flag="--replay-timeout")

    def __post_init__(self) -> None:
        for name, allowed in (("mode", MODES), ("dtype", DTYPES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.prefill_graphs and self.dp_size > 1:
            raise ValueError(f"prefill_graphs (--prefill-graphs) with dp_size {self.dp_size}: DP ranks would have to agree "
                             "on one prefill bucket every step; prefill graphs run with dp_size 1")
        if not self.replay_timeout_s > 0:
            raise ValueError(f"replay_timeout_s (--replay-timeout) must be > 0, got {self.replay_timeout_s}")

    @property
    def world_size(self) -> int:
        return self.tp_size * self.dp_size

    @property
    def blocks_per_seq(self) -> int:
        """KV blocks one request of `max_context` tokens takes."""
        return math.ceil(self.max_context / self.block_size)

    def kv_num_blocks(self) -> int:
        """KV-cache blocks: `num_blocks`, else room for 2 * max_bs full-length requests, so that batches above the
        graphs' max_bs (which must fall back to eager) still fit; plus block 0, reserved."""
        return self.num_blocks or 2 * self.max_bs * self.blocks_per_seq + 1

    @classmethod
    def flag(cls, name: str) -> str:
        """The command-line flag of field `name` (`--max-bs`, `--tp`)."""
        f = next(f for f in dataclasses.fields(cls) if f.name == name)
        return f.metadata["flag"] or f"--{name.replace('_', '-')}"

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
        """One flag per field (`--max-bs`, `--tp`, ...), defaults None so that `from_cli_args` can tell
        a flag given from one left out."""
        for f in dataclasses.fields(cls):
            if f.name in exclude:
                continue
            meta = dict(f.metadata)
            meta.pop("flag")
            flag = cls.flag(f.name)
            if meta.get("action") is None:
                meta.setdefault("type", type(f.default) if f.default is not None else str)
            parser.add_argument(flag, dest=f.name, default=None, **meta)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace, **overrides: Any) -> EngineArgs:
        """The fields given on the command line, then `overrides`, over the defaults."""
        given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}
        return cls(**{**given, **overrides})

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineArgs:
        """The inverse of `as_dict` (after a JSON round trip, which turns tuples into lists)."""
        graph_bs = d.get("graph_bs")
        return cls(**{**d, "graph_bs": tuple(graph_bs) if graph_bs is not None else None})
