"""A pure-torch implementation of the one CPU op of `sgl_kernel` that SGLang's CPU engine needs for a dense model on a
CPU without AMX, standing in for `sgl_kernel`, whose CPU build is not on PyPI (`sglang-kernel` loads on sm90/sm100 GPUs
only). In SGLang's CPU worker it is the module `sgl_kernel` (`startup.py`).

sglang 0.5.23 imports `assign_req_to_token_pool_cpu` on the CPU (`srt/mem_cache/allocation.py:46`) and calls it where
GPUs run the triton kernel `assign_req_to_token_pool` of the same file. Every other name SGLang imports from
`sgl_kernel` imports, so that its modules load, and raises naming itself when called: no op runs silently wrong.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NoReturn

import torch


def assign_req_to_token_pool_cpu(req_pool_indices: torch.Tensor, req_to_token: torch.Tensor, start_offset: torch.Tensor,
                                 end_offset: torch.Tensor, out_cache_loc: torch.Tensor, pool_len: int) -> None:
    """For each request i, write its slice of `out_cache_loc` (the slices lie end to end, in request order) into row
    `req_pool_indices[i]` of `req_to_token`, columns `[start_offset[i], end_offset[i])`; `pool_len` is that table's row
    length."""
    if req_to_token.shape[1] != pool_len:
        raise ValueError(f"assign_req_to_token_pool_cpu: pool_len {pool_len} is not req_to_token's row length "
                         f"{req_to_token.shape[1]}")
    spans = list(zip(req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist()))
    for row, start, end in spans:
        if not 0 <= start <= end <= pool_len:
            raise ValueError(f"assign_req_to_token_pool_cpu: columns [{start}, {end}) of row {row} do not lie in "
                             f"[0, {pool_len}]")
    slots = sum(end - start for _, start, end in spans)
    if slots > out_cache_loc.numel():
        raise ValueError(f"assign_req_to_token_pool_cpu: the requests take {slots} slots, out_cache_loc has "
                         f"{out_cache_loc.numel()}")
    offset = 0
    for row, start, end in spans:
        req_to_token[row, start:end] = out_cache_loc[offset:offset + end - start]
        offset += end - start

class MissingOp(NotImplementedError):
    """SGLang called an `sgl_kernel` op that this pure-torch stand-in does not implement."""


def __getattr__(name: str) -> Callable[..., NoReturn]:
    if name.startswith("__"):  # module protocol lookups (__path__, __file__...): not ops
        raise AttributeError(name)

    def missing(*args: object, **kwargs: object) -> NoReturn:
        raise MissingOp(f"sgl_kernel.{name} is not implemented here: sgl_kernel's CPU build is not on PyPI, and "
                        f"npugraph-harness's pure-torch stand-in ({__name__}) provides only assign_req_to_token_pool_cpu")

    missing.__name__ = missing.__qualname__ = name
    return missing
