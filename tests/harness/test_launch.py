"""The launcher: a bad layout is refused before any rank starts; a rank that fails, hangs, dies or stops fails
the run with its own message (its pid where it could not say) in bounded time; no rank outlives the run; torchrun
runs the same worker."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness.inputs.checkpoints import ensure_checkpoint
from harness.inputs.workloads import make_requests
from harness.targets.launch import RankFailed, RankJob, RankResult, launch, merge, validate_layout
from reference_runner.engine.args import EngineArgs
from reference_runner.errors import LayoutError
from reference_runner.records import Generation
from suites.faults import RANK_FAULTS

EXIT_WITHIN_S = 60


def make_job(model: str = "llama", tp: int = 1, dp: int = 1, **fields) -> RankJob:
    engine = EngineArgs(tp_size=tp, dp_size=dp)
    return RankJob(str(ensure_checkpoint(model)), make_requests("mixed", 512, 4), engine, **fields)


def signal_rank_at_start(rank: int, sig: signal.Signals) -> None:
    """In the background: send `sig` to launched rank `rank` as soon as its process exists."""

    def send() -> None:
        deadline = time.monotonic() + EXIT_WITHIN_S
        while time.monotonic() < deadline:
            for pid in live_children():
                try:
                    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                if f"RANK={rank}".encode() in environ:
                    os.kill(pid, sig)
                    return
            time.sleep(0.01)

    threading.Thread(target=send, daemon=True).start()


def live_children() -> list[int]:
    """Pids of this process's children that have not been reaped."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():
            children.append(int(stat.parent.name))
    return children


@pytest.mark.parametrize(("model", "tp", "dp", "message"), [
    ("llama", 3, 1, "tp 3 does not divide num_attention_heads 4"),
    ("llama", 4, 4, "tp 4 x dp 4 = 16 ranks, but device 'cpu' has 8 available here"),
    ("llama", 0, 1, "tp and dp must be >= 1, got tp=0 dp=1"),
])
def test_bad_layout_is_refused_before_any_rank_starts(model, tp, dp, message):
    with pytest.raises(LayoutError, match=f"^{message}$"):
        validate_layout(make_job(model, tp=tp, dp=dp))


def test_vocabulary_with_an_empty_last_shard_is_refused():
    job = RankJob(str(ensure_checkpoint("llama", vocab_size=6)), [], EngineArgs(tp_size=4))
    with pytest.raises(LayoutError, match="a vocabulary of 6 cannot be split over tensor-parallel size 4: the last "
                                         "rank would hold no row"):
        validate_layout(job)


def test_dp_ranks_must_cover_every_request():
    with pytest.raises(LayoutError, match=r"dp_ranks must give each of the 8 requests a DP rank in 0\.\.1"):
        validate_layout(make_job(dp=2, dp_ranks=[0, 1, 2, 0, 1, 0, 1, 0]))


def test_merge_puts_each_dp_rank_generation_back_in_request_order():
    job = RankJob("unused", make_requests("batch5", 512, 4), EngineArgs(dp_size=2), dp_ranks=[1, 0, 1, 1, 0])
    results = [RankResult(rank=d, tp_rank=0, dp_rank=d, generations=[Generation(rid) for rid in rids])
               for d, rids in ((0, ["b1", "b4"]), (1, ["b0", "b2", "b3"]))]
    assert [g.rid for g in merge(job, results)] == ["b0", "b1", "b2", "b3", "b4"]


@pytest.mark.multirank
def test_rank_that_raises_fails_the_run_with_its_message():
    start = time.monotonic()
    with pytest.raises(RankFailed, match=r"^rank 1: RuntimeError: injected($|\n)"):  # the cause, not its peer
        launch(make_job(tp=2, setup=RANK_FAULTS["raises_at_start"]))
    assert time.monotonic() - start < EXIT_WITHIN_S
    assert live_children() == []


@pytest.mark.multirank
def test_rank_stuck_outside_collectives_times_out_its_peers_collective():
    start = time.monotonic()
    with pytest.raises(RankFailed, match=r"^rank 0: RuntimeError: .*Timed out waiting 3000ms"):
        launch(make_job(tp=2, setup=RANK_FAULTS["hangs_outside_collectives"], dist_timeout_s=3))
    assert time.monotonic() - start < EXIT_WITHIN_S
    assert live_children() == []


@pytest.mark.multirank
def test_ranks_that_never_finish_are_killed_at_the_run_timeout():
    with pytest.raises(RankFailed, match=r"^rank\(s\) \[0, 1\] did not finish within 5 s$"):
        launch(make_job(tp=2, setup=RANK_FAULTS["every_rank_hangs"]), timeout_s=5)
    assert live_children() == []


@pytest.mark.multirank
@pytest.mark.parametrize(("sig", "message"), [
    (signal.SIGSTOP, r"is stopped \(SIGSTOP\) and has not joined the job after \d+ s$"),
    (signal.SIGKILL, r"was killed by SIGKILL without reporting an error; log tail:"),
], ids=["stopped", "killed"])
def test_a_rank_stopped_or_killed_at_start_up_is_named_with_its_pid(sig, message):
    signal_rank_at_start(1, sig)
    with pytest.raises(RankFailed, match=r"^rank 1 \(pid \d+\) " + message):
        launch(make_job(tp=2))
    assert live_children() == []


@pytest.mark.multirank
def test_a_rank_stopped_after_joining_is_named():
    with pytest.raises(RankFailed, match=r"^rank 1 \(pid \d+\) is stopped \(SIGSTOP\) after joining the job$"):
        launch(make_job(tp=2, setup=RANK_FAULTS["stops_itself"]))
    assert live_children() == []


@pytest.mark.multirank
def test_torchrun_runs_the_worker_entry(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "harness.targets.launch",
                    "--model", "llama", "--tp", "2", "--max-new-tokens", "4", "--out", str(tmp_path)],
                   check=True, timeout=EXIT_WITHIN_S, env={**os.environ, "OMP_NUM_THREADS": "1"})
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["tp_rank"], len(r["generations"])) for r in ranks] == [(0, 8), (1, 8)]
    assert ranks[0]["generations"] == ranks[1]["generations"]  # TP ranks agree on every token


@pytest.mark.multirank
def test_a_multi_rank_run_reports_graph_memory_summed_over_ranks_and_the_longest_capture(monkeypatch):
    from harness.inputs.scenarios import Scenario
    from harness.targets import reference

    ranks = []
    monkeypatch.setattr(reference, "launch", lambda job: ranks.extend(launch(job)) or ranks)
    scenario = Scenario(model="llama", baseline="eager", engine=EngineArgs(mode="graph", tp_size=2, max_bs=4),
                        workload="mixed", max_new_tokens=4)
    job = make_job(tp=2)
    run = reference.ReferenceTarget("cpu").run(scenario, Path(job.checkpoint), job.requests)
    assert all(r.graph_memory["all_buckets_bytes"] > 0 and r.capture_seconds > 0 for r in ranks)
    assert run.graph_memory == {key: ranks[0].graph_memory[key] + ranks[1].graph_memory[key]
                                for key in ("largest_bucket_bytes", "all_buckets_bytes")}
    assert run.capture_seconds == max(r.capture_seconds for r in ranks)
