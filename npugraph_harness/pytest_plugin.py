"""pytest plugin: the `npugraph` fixture, to judge graph mode from your own test suite.

    def test_graph_mode(npugraph):
        npugraph.check(model=PATH, target="sglang", modes=["eager", "graph"]).assert_passed()

Registered through the `pytest11` entry point when npugraph-harness is installed. A failed check fails the test
with each failed scenario and its first divergence (request, step, both tokens, their logprobs and the margin) in
the assertion message. With `--npugraph-json`, each check writes its JSON report beside pytest's JUnit XML (the
folder of `--junitxml`, else the working directory), named after the test.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("npugraph", "npugraph-harness checks run from tests (the npugraph fixture)")
    group.addoption("--npugraph-json", action="store_true",
                    help="write each npugraph.check's JSON report beside --junitxml's file (else into the working "
                         "directory), named after its test")


class NpuGraph:
    """The `npugraph` fixture: `check(**options)` runs `npugraph_harness.check` for the test that asked for it."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self._request = request
        self._checks = 0

    def check(self, **options: Any):
        """`npugraph_harness.check(**options)`; its JSON report written beside the JUnit XML when asked."""
        import npugraph_harness

        folder = report_folder(self._request.config)
        if folder is not None and "json" not in options:
            self._checks += 1
            name = re.sub(r"[^\w.-]+", "_", self._request.node.nodeid)
            options["json"] = folder / f"{name}{f'-{self._checks}' if self._checks > 1 else ''}.json"
        return npugraph_harness.check(**options)


def report_folder(config: pytest.Config) -> Path | None:
    """Where `--npugraph-json` writes: the folder of `--junitxml`, else the working directory; None without it."""
    if not config.getoption("npugraph_json"):
        return None
    junit = config.getoption("xmlpath", None)
    return Path(junit).parent if junit else Path.cwd()


@pytest.fixture
def npugraph(request: pytest.FixtureRequest) -> NpuGraph:
    """Judge an engine's graph mode from this test: `npugraph.check(model=..., modes=[...]).assert_passed()`."""
    return NpuGraph(request)
