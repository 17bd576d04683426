"""Run a function on local gloo ranks joined through env:// (the multi-rank unit tests' launcher)."""
import os
import socket

import torch
import torch.multiprocessing as mp

from reference_runner.parallel.state import destroy_parallel


def run_ranks(fn, world: int, *args, timeout_s: float = 60) -> list:
    """`fn(*args)` on `world` spawned ranks (env:// set for init_parallel); their results, by rank."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(rank, world, port, fn, args, results)) for rank in range(world)]
    for p in procs:
        p.start()
    outputs = dict(results.get(timeout=timeout_s) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    errors = [out for out in outputs.values() if isinstance(out, str)]
    assert not errors, errors
    return [outputs[rank] for rank in range(world)]


def _rank(rank, world, port, fn, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    try:
        results.put((rank, fn(*args)))
    except Exception as e:  # reported, so that the parent fails at once
        results.put((rank, f"rank {rank}: {type(e).__name__}: {e}"))
    finally:
        destroy_parallel()
