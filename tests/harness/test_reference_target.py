"""The reference target's warm-up: a check starts it before its first scenario, with the modes it will run."""
import pytest

from harness.targets.reference import ReferenceTarget
from reference_runner.sim import piecewise


@pytest.mark.parametrize(("modes", "probes"), [
    (["eager", "graph"], 0),
    (["eager", "compile"], 1),
    (["compile_nograph", "compile"], 2),  # each asks; the probe itself starts once per process
])
def test_the_reference_target_warms_up_the_cpu_backends_of_compiled_modes_only(monkeypatch, modes, probes):
    started = []
    monkeypatch.setattr(piecewise, "probe_cpu_isa", lambda: started.append(True))
    ReferenceTarget("cpu").warm_up(modes)
    assert len(started) == probes
