"""torch_npu release lines, as far as NPUGraph's auto-dispatch capture and `update()` differ between them.

The behaviour follows the release line (7.1, 7.2, ...), each shipped for several torch versions at once, not
the torch version. Read from `torch_npu/npu/graphs.py` and `torch_npu/npu/_npugraph_handlers/` at each
release tag (docs/npu.md, "Differences by release"). SimNPUGraph takes one of these and behaves as it;
the npu graph backend names the installed one in its errors.
"""
from __future__ import annotations

from dataclasses import dataclass

FIA, FIA_V2 = "npu_fused_infer_attention_score", "npu_fused_infer_attention_score_v2"


def _names(op: str, *overloads: str) -> frozenset[str]:
    """`op` and `op.<overload>`: what `__torch_dispatch__` compares `func.__name__` with."""
    return frozenset({op, *(f"{op}.{overload}" for overload in overloads)})


@dataclass(frozen=True)
class TorchNpuRelease:
    """What one torch_npu release line does with updatable ops in a graph."""

    name: str  # the release line, e.g. "7.2"
    pip: tuple[str, ...]  # torch_npu versions on PyPI built from it
    intercepted: frozenset[str]  # op names auto dispatch capture records as task groups; any other op is a plain kernel
    update_length_checked: bool  # a cpu_update_input whose length is not the task-group count raises (else: zip)
    captured_keys_only: bool  # update() replaces only arguments passed at capture (else: inserts any key)
    shared_update_stream: bool  # one update stream for every graph of the process (else: one per graph)

    @property
    def fia_v2(self) -> bool:
        """Whether `npu_fused_infer_attention_score_v2` becomes a task group."""
        return f"{FIA_V2}.default" in self.intercepted

    def intercepts(self, op_name: str) -> bool:
        """Whether a call dispatched as `op_name` (`<op>.<overload>`) is recorded as a task group."""
        return op_name in self.intercepted

    def __str__(self) -> str:
        return f"torch_npu {self.name}"


# 7.1 matches the bare name, which a dispatched OpOverload never has (its name always carries the overload,
# `.default` for the unnamed one): only explicit `.out` calls become task groups there.
_V71 = _names(FIA, "out")
_V72 = _V71 | {f"{FIA}.default"}
_V73 = _V72 | _names(FIA_V2, "default", "out") | {"_npu_paged_attention.default", "npu_multi_head_latent_attention.out"}

RELEASES = {r.name: r for r in (
    TorchNpuRelease("7.1", ("2.6.0",), _V71, update_length_checked=False, captured_keys_only=False,
                    shared_update_stream=False),
    TorchNpuRelease("7.2", ("2.6.0.post3", "2.7.1", "2.8.0"), _V72, update_length_checked=False,
                    captured_keys_only=False, shared_update_stream=False),
    TorchNpuRelease("7.3", ("2.6.0.post5", "2.7.1.post2", "2.8.0.post2", "2.9.0"), _V73, update_length_checked=False,
                    captured_keys_only=True, shared_update_stream=True),
    TorchNpuRelease("26.0", ("2.7.1.post4", "2.8.0.post4", "2.9.0.post2", "2.10.0"), _V73, update_length_checked=True,
                    captured_keys_only=True, shared_update_stream=True),
    TorchNpuRelease("26.1", ("2.9.0.post6", "2.10.0.post4", "2.11.0"), _V73, update_length_checked=True,
                    captured_keys_only=True, shared_update_stream=True),
)}

# The lowest release the runner is correct on, pinned in pyproject.toml's `ascend` extra (`torch_npu>=2.7.1`):
# 7.2 is the first to record FIA called plainly (`.default`) as a task group. The runner refreshes the one
# argument it passed at capture, broadcast in one dict, from one thread, and counts the task groups itself,
# so the later changes (length check, captured keys only, shared update stream) change nothing for it.
TORCH_NPU_FLOOR = RELEASES["7.2"]


def release_of(pip_version: str) -> TorchNpuRelease | None:
    """The release line a torch_npu version on PyPI was built from, or None for one not in the table."""
    version = pip_version.split("+")[0]
    return next((r for r in RELEASES.values() if version in r.pip), None)
