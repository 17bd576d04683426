"""Building blocks of a Llama-family decoder, tensor-parallel ready.

Each parallel layer holds only its rank's shard and knows how to cut it out of a full checkpoint
tensor: `weight_loader(param, loaded_weight[, shard_id])`, as in SGLang and vLLM. `loaded_weight` is a
tensor or a safetensors slice (read lazily), so a rank reads only its own part of the file.
At tp_size 1 no collective runs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from reference_runner.parallel.collectives import all_gather_last_dim, all_reduce
from reference_runner.parallel.state import ParallelState, divide, kv_heads_per_rank


def _param(*shape: int) -> nn.Parameter:
    # Inference only: no autograd bookkeeping, and no grad mode to trip over during capture.
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


def check_shape(loaded_weight, expected: tuple[int, ...]) -> None:
    """Refuse a checkpoint tensor (a tensor or a lazy safetensors slice) whose whole shape is not `expected`:
    checked before a loader cuts out its shard, so that a tensor larger than the config says is never cut to size."""
    shape = tuple(loaded_weight.get_shape() if hasattr(loaded_weight, "get_shape") else loaded_weight.shape)
    if shape != tuple(expected):
        raise ValueError(f"has shape {shape}, expected {tuple(expected)}")


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of `t` is finite, in one pass: its min and max (a NaN makes both NaN), far faster on
    the CPU than `isfinite(t).all()`."""
    if t.numel() == 0:
        return True
    low, high = torch.aminmax(t)
    return math.isfinite(float(low)) and math.isfinite(float(high))


def copy_weight(dst: torch.Tensor, src: torch.Tensor) -> None:
    """`dst.copy_(src)` that refuses to broadcast, and refuses a value that is not finite once cast to `dst`'s dtype
    (NaN, inf, or beyond the range of a 16-bit dtype): a checkpoint error, not a silent fill or a poisoned run."""
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
    cast = src.to(dst.dtype)
    if not all_finite(cast):
        finite = torch.isfinite(cast)
        index = int((~finite).flatten().nonzero()[0])
        value = float(src.flatten()[index])
        where = f"at flat index {index} of the loaded part"
        raise ValueError(f"holds {value} {where}" if not math.isfinite(value)
                         else f"holds {value:g} {where}, beyond the range of {dst.dtype}")
    dst.copy_(cast)


def default_weight_loader(param: nn.Parameter, loaded_weight) -> None:
    """Load a replicated parameter whole."""
    check_shape(loaded_weight, param.shape)
    copy_weight(param.data, loaded_weight[:])


class RMSNorm(nn.Module):
    """RMSNorm like transformers: normalised in float32, cast back, then scaled by the weight in the model dtype.

    `forward(x, residual)` adds the residual first and returns (normed, new residual).
    """

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = _param(hidden_size)
        self.weight.weight_loader = default_weight_loader
        self.eps = eps
        self.shape = (hidden_size,)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is not None:
            x = x + residual
            residual = x
        # F.rms_norm upcasts to float32 internally and casts back: bit-identical to transformers' steps.
        out = self.weight * F.rms_norm(x, self.shape, eps=self.eps)
        return out if residual is None else (out, residual)


class RotaryEmbedding(nn.Module):
    """Neox-style RoPE over a cos/sin cache built once for `max_positions`, gathered by position.

    The cache rows are `[cos, sign * sin]` so that `rotate_half(x) * sin` becomes `roll(x, d/2) * sin'`:
    one op instead of four, bit-identical (a sign flip is exact).
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None = None):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        if scaling is not None:
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        # Same float32 product as transformers computes per step, so the values match bit for bit.
        freqs = torch.arange(max_positions, dtype=torch.float)[:, None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        sign = torch.ones(head_dim, dtype=torch.float)
        sign[: head_dim // 2] = -1
        cache = torch.stack((emb.cos(), emb.sin() * sign), dim=1)  # [max_positions, 2, head_dim]
        self.register_buffer("cos_sin_cache", cache[:, :, None, :].to(torch.get_default_dtype()), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin for each position, shaped [num_tokens, 1, head_dim] to broadcast over heads."""
        return self.cos_sin_cache.index_select(0, positions).unbind(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rotate x [num_tokens, heads, head_dim] with the cos and signed sin of `RotaryEmbedding`."""
    return x * cos + x.roll(head_dim // 2, -1) * sin


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    # Llama 3.1 frequency scaling, as transformers' `_compute_llama3_parameters`.
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


class ReplicatedLinear(nn.Module):
    """y = x W^T with the whole weight on every rank (MoE routers, the shared-expert gate)."""

    def __init__(self, input_size: int, output_size: int):
        super().__init__()
        self.weight = _param(output_size, input_size)
        self.weight.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's output rows split over TP ranks; several checkpoint tensors may be fused.

    `output_sizes` are the full (unsharded) sizes of the fused parts, e.g. [intermediate, intermediate]
    for gate_up; each rank holds its slice of every part, parts laid out one after another.
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool, parallel: ParallelState):
        super().__init__()
        self.parallel = parallel
        self.output_sizes = list(output_sizes)  # each part's rows in the checkpoint
        self.part_sizes = [divide(size, parallel.tp_size) for size in output_sizes]
        self.weight = _param(sum(self.part_sizes), input_size)
        self.bias = _param(sum(self.part_sizes)) if bias else None
        for p in (self.weight, self.bias):
            if p is not None:
                p.weight_loader = self.weight_loader

    def shard_rank(self, shard_id: int) -> int:
        """Which slice of part `shard_id` this rank holds."""
        return self.parallel.tp_rank

    def weight_loader(self, param: nn.Parameter, loaded_weight, shard_id: int = 0) -> None:
        check_shape(loaded_weight, (self.output_sizes[shard_id], *param.shape[1:]))
        size = self.part_sizes[shard_id]
        offset = sum(self.part_sizes[:shard_id])
        start = self.shard_rank(shard_id) * size
        copy_weight(param.data.narrow(0, offset, size), loaded_weight[start:start + size])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q, k, v projections (shard ids 0, 1, 2), heads split over ranks.

    With more ranks than kv heads each kv head is replicated on tp_size / num_kv_heads ranks.
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 parallel: ParallelState):
        tp = parallel.tp_size
        self.kv_replicas = max(1, tp // num_kv_heads)
        kv_size = head_dim * kv_heads_per_rank(num_kv_heads, tp) * tp  # the replicated size, split over ranks
        super().__init__(hidden_size, [head_dim * num_heads, kv_size, kv_size], bias, parallel)
        self.output_sizes = [head_dim * num_heads, head_dim * num_kv_heads, head_dim * num_kv_heads]

    def shard_rank(self, shard_id: int) -> int:
        return self.parallel.tp_rank // (self.kv_replicas if shard_id else 1)


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's input columns split over TP ranks; partial sums are all-reduced."""

    def __init__(self, input_size: int, output_size: int, bias: bool, parallel: ParallelState):
        super().__init__()
        self.parallel = parallel
        self.full_input_size = input_size
        self.input_size = divide(input_size, parallel.tp_size)
        self.weight = _param(output_size, self.input_size)
        self.weight.weight_loader = self.weight_loader
        self.bias = _param(output_size) if bias else None
        if bias:
            self.bias.weight_loader = default_weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight) -> None:
        check_shape(loaded_weight, (param.shape[0], self.full_input_size))
        start = self.parallel.tp_rank * self.input_size
        copy_weight(param.data, loaded_weight[:, start:start + self.input_size])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = all_reduce(F.linear(x, self.weight), self.parallel)
        # The bias is added once, after the sum, not once per rank.
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding with vocabulary rows split over TP ranks (padded so every rank holds the same count)."""

    def __init__(self, vocab_size: int, hidden_size: int, parallel: ParallelState):
        super().__init__()
        self.parallel = parallel
        self.vocab_size = vocab_size
        self.rows = -(-vocab_size // parallel.tp_size)
        if self.rows * (parallel.tp_size - 1) >= vocab_size:
            raise ValueError(f"a vocabulary of {vocab_size} cannot be split over tensor-parallel size "
                             f"{parallel.tp_size}: the last rank would hold no row")
        self.start = parallel.tp_rank * self.rows
        self.weight = _param(self.rows, hidden_size)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight) -> None:
        check_shape(loaded_weight, (self.vocab_size, param.shape[1]))  # rows == vocab_size, never cut to it
        end = min(self.start + self.rows, self.vocab_size)
        param.data.zero_()  # padding rows of the last rank stay zero
        copy_weight(param.data[: end - self.start], loaded_weight[self.start:end])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.parallel.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        # Ids of other ranks look up row 0 and are zeroed by the mask: no data-dependent shapes.
        local = input_ids - self.start
        mask = (local >= 0) & (local < self.rows)
        out = F.embedding(local * mask, self.weight) * mask.unsqueeze(-1).to(self.weight.dtype)
        return all_reduce(out, self.parallel)


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection to float32 logits, vocabulary split over TP ranks and gathered."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = all_gather_last_dim(F.linear(hidden, self.weight), self.parallel)
        if self.rows * self.parallel.tp_size != self.vocab_size:
            logits = logits[..., : self.vocab_size]
        return logits.float()
