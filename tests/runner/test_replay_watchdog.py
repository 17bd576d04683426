"""NPUGraphRunner waits for each replay under a timeout: a replay the device never finishes fails the step with
the hang it is, naming the graph, and the stuck replay is let go. Checked on the CPU with an event, recorded after
the replay, that the device never reaches."""
import dataclasses
import threading
import time

import pytest
import torch

from harness.cli import main
from harness.exits import EXIT_USAGE
from harness.inputs.checkpoints import ensure_checkpoint
from reference_runner.engine.args import EngineArgs
from reference_runner.engine.engine import Engine
from reference_runner.engine.forward_batch import decode_batch
from reference_runner.errors import ReplayHang

RETURNS_WITHIN_S = 30  # a bound on a hang, far above the timeout: not a speed measure


@pytest.fixture
def device_released():
    """Set when the test ends: the stuck replay finishes then."""
    released = threading.Event()
    yield released
    released.set()


def test_a_replay_that_never_finishes_fails_after_the_timeout_naming_the_graph(device_released):
    class NeverReached:
        """An event recorded after a replay that blocks on the device until released."""

        def record(self):
            pass

        def query(self):
            return device_released.is_set()

    let_go = []
    engine = Engine(ensure_checkpoint("llama"), EngineArgs(mode="graph", graph_bs=(2,), replay_timeout_s=0.2))
    runner = engine.model_runner.graph_runner
    runner.backend = dataclasses.replace(runner.backend, new_event=NeverReached, unblock=let_go.append)
    batch = decode_batch(engine.kv_cache, ["a", "b"], [3, 5], torch.zeros(2, dtype=torch.int64))
    start = time.monotonic()
    with pytest.raises(ReplayHang, match=r"^graph bs=2: replay not finished after 0.2 s: it would wait forever, for a "
                                         r"task group's ExternalEvent that no update\(\) recorded since the previous replay$"):
        runner.replay(batch)
    assert time.monotonic() - start < RETURNS_WITHIN_S
    assert let_go == [runner.graphs[2]]


def test_a_replay_timeout_of_0_exits_2_with_one_line(capsys):
    assert main(["check", "--replay-timeout", "0"]) == EXIT_USAGE
    assert capsys.readouterr().err == "npugraph-harness: error: replay_timeout_s (--replay-timeout) must be > 0, got 0.0\n"
