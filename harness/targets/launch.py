"""Multi-rank reference runs: start the ranks here, or let torchrun start them.

Every rank is `python -m harness.targets.launch` (the worker entry below): it joins the job through env://
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), runs the reference Engine on its DP
rank's share of the requests and writes `rank{R}.json` (or `rank{R}.error`) into `--out`.
`launch` starts tp * dp local ranks that way, each in its own process group, waits for them and
reads their files back. The first rank that fails fails the run with that rank's message, and the
others are killed at once; a rank stopped (SIGSTOP) for STOPPED_GRACE_S fails it too, named with its
pid and whether it had joined the job (`rank{R}.joined`); every collective also times out
(`dist_timeout_s`), so a rank stuck in a collective whose peer died gives up too. Nothing outlives
`launch`: however it ends (SIGINT and SIGTERM included), every rank's process group is killed and its
scratch directory removed, and on Linux a rank dies with the process that launched it even if that
one is killed outright (SIGKILL); the next launch removes the scratch directories of dead launchers.

Under torchrun (one line per node; `--nnodes 1` on a single host):

    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m harness.targets.launch --model /path/to/checkpoint --tp 8 --dp 2 --mode graph --device npu --out results/
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness.scratch import scratch
from harness.stops import raise_if_stopped, signals_deferred
from harness.targets.subprocesses import kill, log_tail, python_env, signal_name, start
from reference_runner.engine.args import EngineArgs
from reference_runner.errors import LayoutError
from reference_runner.parallel.state import DIST_TIMEOUT_S
from reference_runner.records import Generation, Request

MAX_CPU_RANKS = 8  # gloo ranks on the CPU share its cores: beyond 8 a run only gets slower
PEER_FAILURE_GRACE_S = 2.0
STOPPED_GRACE_S = 2.0  # a rank stopped this long (SIGSTOP, Ctrl-Z of its own) fails the run instead of hanging it


class RankFailed(RuntimeError):
    """A rank raised, died or did not finish in time; the message says which and why."""


@dataclass
class RankJob:
    """What every rank runs: the engine, all requests, and which DP rank serves each."""

    checkpoint: str
    requests: list[Request]
    engine: EngineArgs
    device: str = "cpu"
    dp_ranks: list[int] | None = None  # DP rank of each request; None: round robin
    setup: str | None = None  # "module:function" called with the ParallelState before the engine is built
    dist_timeout_s: float = DIST_TIMEOUT_S  # every collective

    def dp_rank_of(self) -> list[int]:
        """The DP rank of each request."""
        dp = self.engine.dp_size
        return self.dp_ranks if self.dp_ranks is not None else [i % dp for i in range(len(self.requests))]


@dataclass
class RankResult:
    """One rank's generations (its DP rank's requests, in request order) and how its decode steps ran."""

    rank: int
    tp_rank: int
    dp_rank: int
    generations: list[Generation]
    graph_steps: int = 0
    eager_steps: int = 0
    fallback_reasons: dict[str, int] = field(default_factory=dict)
    prefill_graph_steps: int = 0
    prefill_eager_steps: int = 0
    graph_memory: dict[str, int] | None = None  # this rank's graphs (`Engine.graph_memory`); None in eager mode
    capture_seconds: float = 0.0  # this rank's capturing (and compiling)


def available_ranks(device: str) -> int:
    """How many local ranks `device` can hold: one per accelerator, or MAX_CPU_RANKS gloo ranks on the CPU."""
    if device == "cpu":
        return MAX_CPU_RANKS
    return getattr(torch, device).device_count()


def validate_layout(job: RankJob) -> None:
    """Raise LayoutError if the job cannot run as laid out: before any rank starts."""
    from reference_runner.models import get_model_class
    from reference_runner.models.loader import read_config
    from reference_runner.parallel.state import ParallelState

    tp, dp = job.engine.tp_size, job.engine.dp_size
    if tp < 1 or dp < 1:
        raise LayoutError(f"tp and dp must be >= 1, got tp={tp} dp={dp}")
    if tp * dp > available_ranks(job.device):
        raise LayoutError(f"tp {tp} x dp {dp} = {tp * dp} ranks, but device {job.device!r} has "
                         f"{available_ranks(job.device)} available here")
    config = read_config(job.checkpoint)
    if config.num_attention_heads % tp:
        raise LayoutError(f"tp {tp} does not divide num_attention_heads {config.num_attention_heads}")
    if job.dp_ranks is not None and (len(job.dp_ranks) != len(job.requests)
                                     or any(not 0 <= d < dp for d in job.dp_ranks)):
        raise LayoutError(f"dp_ranks must give each of the {len(job.requests)} requests a DP rank in 0..{dp - 1}")
    # Every other sharding rule (KV heads, intermediate sizes, vocabulary) is checked by building the
    # last rank's shard of the model without memory.
    try:
        with torch.device("meta"):
            get_model_class(config.architecture)(config, ParallelState(tp - 1, tp, dp - 1, dp), job.engine.max_context)
    except ValueError as e:
        raise LayoutError(f"tp {tp} x dp {dp} does not fit {job.checkpoint}: {e}") from None


def launch(job: RankJob, timeout_s: float = 600.0) -> list[RankResult]:
    """Run `job` on tp * dp local ranks; their results by rank. Raises LayoutError before starting
    any rank if the layout cannot run, RankFailed if a rank fails."""
    validate_layout(job)
    world = job.engine.world_size
    with scratch(Path(tempfile.gettempdir()), "npugraph-launch-") as out:
        (out / "job.json").write_text(json.dumps(dataclasses.asdict(job)))
        env = python_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(world),
                         LOCAL_WORLD_SIZE=str(world),
                         OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))  # as torchrun: ranks share the cores
        procs: list[subprocess.Popen] = []
        try:
            for rank in range(world):
                start("harness.targets.launch", ["--job", str(out / "job.json"), "--out", str(out)],
                      {**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, out / f"rank{rank}.log",
                      die_with_parent=True, started=procs)
            _wait(procs, out, timeout_s)
        finally:
            with signals_deferred():  # a second Ctrl-C must not leave ranks behind
                kill(procs)
        return [_read_result(out / f"rank{rank}.json") for rank in range(world)]


def merge(job: RankJob, results: list[RankResult]) -> list[Generation]:
    """Every request's generation, in request order, from the first TP rank of its DP rank."""
    per_dp = {r.dp_rank: iter(r.generations) for r in results if r.tp_rank == 0}
    return [next(per_dp[d]) for d in job.dp_rank_of()]


def _wait(procs: list[subprocess.Popen], out: Path, timeout_s: float) -> None:
    began = time.monotonic()
    stopped_since: dict[int, float] = {}
    while True:
        raise_if_stopped()
        codes = [p.poll() for p in procs]
        if any(code not in (None, 0) for code in codes):
            raise RankFailed(_failures(procs, out))
        if all(code == 0 for code in codes):
            return
        now = time.monotonic()
        for rank, p in enumerate(procs):
            if codes[rank] is None and _is_stopped(p.pid):
                since = stopped_since.setdefault(rank, now)
                if now - since >= STOPPED_GRACE_S:
                    joined = ("after joining the job" if _joined(out, rank)
                              else f"and has not joined the job after {now - began:.0f} s")
                    raise RankFailed(f"rank {rank} (pid {p.pid}) is stopped (SIGSTOP) {joined}")
            else:
                stopped_since.pop(rank, None)
        if now - began > timeout_s:
            stuck = [rank for rank, code in enumerate(codes) if code is None]
            raise RankFailed(f"rank(s) {stuck} did not finish within {timeout_s:g} s")
        time.sleep(0.05)


def _is_stopped(pid: int) -> bool:
    # State T in /proc/PID/stat: stopped by a signal (not `t`, a debugger's tracing stop). Off Linux: never known.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except (OSError, IndexError):
        return False


def _joined(out: Path, rank: int) -> bool:
    return (out / f"rank{rank}.joined").is_file()


def _failures(procs: list[subprocess.Popen], out: Path) -> str:
    # Peers of a failed rank fail in turn (connection closed): let them, then name the first to fail.
    deadline = time.monotonic() + PEER_FAILURE_GRACE_S
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.05)
    failed = sorted((rank for rank, p in enumerate(procs) if p.poll() not in (None, 0)),
                    key=lambda rank: _failure_time(out, rank))
    message = _failure(out, failed[0], procs[failed[0]])
    return message + (f"\n(then rank(s) {failed[1:]} failed too)" if failed[1:] else "")


def _failure_time(out: Path, rank: int) -> int:
    # When it wrote its error, else (a crash) when it last logged.
    error = out / f"rank{rank}.error"
    return (error if error.is_file() else out / f"rank{rank}.log").stat().st_mtime_ns


def _failure(out: Path, rank: int, proc: subprocess.Popen) -> str:
    error = out / f"rank{rank}.error"
    if error.is_file():
        return error.read_text()
    code = proc.returncode
    how = f"was killed by {signal_name(-code)}" if code < 0 else f"exited with status {code}"
    return f"rank {rank} (pid {proc.pid}) {how} without reporting an error; log tail:\n" + log_tail(out / f"rank{rank}.log")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job_from_dict(d: dict) -> RankJob:
    return RankJob(**{**d, "requests": [Request(**r) for r in d["requests"]], "engine": EngineArgs.from_dict(d["engine"])})


def _read_result(path: Path) -> RankResult:
    d = json.loads(path.read_text())
    return RankResult(**{**d, "generations": [Generation.from_dict(g) for g in d["generations"]]})


def run_rank(job: RankJob, out: Path) -> None:
    """The work of one rank (env:// variables set): join, run its DP rank's requests, write its result."""
    from reference_runner.engine.engine import Engine
    from reference_runner.parallel.state import destroy_parallel, init_parallel

    parallel = init_parallel(job.engine.tp_size, job.engine.dp_size, job.device, job.dist_timeout_s)
    (out / f"rank{parallel.rank}.joined").touch()
    if job.setup:
        module, function = job.setup.split(":")
        getattr(importlib.import_module(module), function)(parallel)
    engine = Engine(job.checkpoint, job.engine, device=job.device, parallel=parallel)
    mine = [req for req, d in zip(job.requests, job.dp_rank_of()) if d == parallel.dp_rank]
    generations = engine.generate(mine)
    stats = engine.stats
    result = RankResult(parallel.rank, parallel.tp_rank, parallel.dp_rank, generations, stats.graph_steps,
                        stats.eager_steps, dict(stats.fallback_reasons), stats.prefill_graph_steps,
                        stats.prefill_eager_steps, engine.graph_memory(), engine.capture_seconds)
    (out / f"rank{parallel.rank}.json").write_text(json.dumps(dataclasses.asdict(result)))
    destroy_parallel()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m harness.targets.launch", description="one rank of a multi-rank run")
    parser.add_argument("--out", type=Path, required=True, help="directory for rank{R}.json / rank{R}.error")
    parser.add_argument("--job", type=Path, help="a RankJob as JSON (what `launch` passes); else the options below")
    parser.add_argument("--model", help="builtin model name or checkpoint directory")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workload", default="mixed")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    EngineArgs.add_cli_args(parser)
    return parser


def _job_from_args(args: argparse.Namespace) -> RankJob:
    if args.job:
        return _job_from_dict(json.loads(args.job.read_text()))
    from harness.inputs.checkpoints import ensure_checkpoint  # race-safe: every rank may build it
    from harness.inputs.workloads import make_requests
    from reference_runner.models.loader import read_config

    checkpoint = ensure_checkpoint(args.model)
    requests = make_requests(args.workload, read_config(checkpoint).vocab_size, args.max_new_tokens, args.seed)
    return RankJob(str(checkpoint), requests, EngineArgs.from_cli_args(args), device=args.device)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.job or args.model):
        parser.error("give --job or --model")
    rank = int(os.environ.get("RANK", 0))
    try:
        if not args.job:  # under torchrun; a launched rank's folder is its launcher's, gone once the launcher is
            args.out.mkdir(parents=True, exist_ok=True)
        run_rank(_job_from_args(args), args.out)
    except BaseException as e:  # any failure of this rank is the run's failure
        traceback.print_exc()
        (args.out / f"rank{rank}.error").write_text(f"rank {rank}: {type(e).__name__}: {e}")
        sys.stderr.flush()
        os._exit(1)  # without waiting for communication threads that may be stuck on a dead peer
    return 0


if __name__ == "__main__":
    sys.exit(main())
