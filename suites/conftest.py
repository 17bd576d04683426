"""Suites run scenarios through the same Judge as `npugraph-harness check`."""
import dataclasses
from collections.abc import Iterator

import pytest

from harness.inputs.scenarios import Scenario
from harness.judge import Judge, ScenarioResult
from harness.report import table
from harness.targets import get_target
from reference_runner.attention import default_dtype


@pytest.fixture(scope="session")
def judge(device) -> Iterator[Judge]:
    """One judge per session, so eager baseline runs are shared between scenarios."""
    judge = Judge(get_target("reference", device))
    yield judge
    judge.close()


@pytest.fixture
def check(judge, device):
    """Run a scenario (in the device's default dtype unless it names another) and return its result."""

    def run(scenario: Scenario) -> ScenarioResult:
        if scenario.engine.dtype == "float32":
            scenario = dataclasses.replace(scenario, engine=dataclasses.replace(scenario.engine, dtype=default_dtype(device)))
        result = judge.run(scenario)
        print(table([result]))
        return result

    return run
