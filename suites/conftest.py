"""Suites run scenarios through the same Judge as `npugraph-harness check`."""
import pytest

from harness.judge import Judge, ScenarioResult
from harness.report import table
from harness.scenarios import Scenario
from harness.targets import get_target


@pytest.fixture(scope="session")
def judge(device) -> Judge:
    """One judge per session, so eager reference runs are shared between scenarios."""
    return Judge(get_target("reference", device))


@pytest.fixture
def check(judge):
    """Run a scenario and return its result; the report table goes to the captured output."""

    def run(scenario: Scenario) -> ScenarioResult:
        result = judge.run(scenario)
        print(table([result]))
        return result

    return run
