"""Attention backends, one per device: each writes K/V into the paged cache and attends, and each
carries its device's graph policy (what a padded row's length is, which host list a captured decode
must have refreshed before a replay), as SGLang's attention backends do.

| device | backend                  | decode                                   | a captured decode reads        |
|--------|--------------------------|------------------------------------------|--------------------------------|
| cpu    | `TorchNativeAttnBackend` | `npugraph::paged_attention` (FIA's contract) | host list, `graph.update()`  |
| npu    | `AscendAttnBackend`      | `npu_fused_infer_attention_score` (FIA)  | host list, `graph.update()`    |
| cuda   | `CudaAttnBackend`        | torch paged decode over the block table  | device `seq_lens`, in place    |
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from reference_runner.attention.base import AttentionBackend
    from reference_runner.engine.kv_cache import KVCache

# Imported on first use: the Ascend backend imports torch_npu, which breaks `import torch` without CANN.
_BACKENDS = {
    "cpu": "reference_runner.attention.torch_native:TorchNativeAttnBackend",
    "npu": "reference_runner.attention.ascend:AscendAttnBackend",
    "cuda": "reference_runner.attention.cuda:CudaAttnBackend",
}


def attn_backend_class(device: str) -> type[AttentionBackend]:
    """The attention backend class of `device`."""
    module, name = _BACKENDS[device].split(":")
    return getattr(importlib.import_module(module), name)


def get_attn_backend(device: str, kv_cache: KVCache, num_heads: int) -> AttentionBackend:
    """The attention backend of `device` over `kv_cache` (`num_heads` per TP rank); the same one in eager
    and graph mode."""
    return attn_backend_class(device)(kv_cache, num_heads)


def default_dtype(device: str) -> str:
    """The dtype `device`'s attention runs in by default (bfloat16 on npu: FIA has no float32)."""
    return attn_backend_class(device).default_dtype
