"""Mixture-of-experts layer with static shapes, so that the decode step can be captured into a graph.

Formulation: every token goes through every expert, and a dense [tokens, experts] matrix of routing
weights (the top-k weights scattered into zeros) keeps the experts it was routed to:

    gate, up = x @ W13[all experts]        one GEMM              [T, E, I] each
    y        = (silu(gate) * up) @ W2      one GEMM batched by E [E, T, H]
    out      = sum_e  w[:, e] * y[e]       w: dense routing weights, zero off the top-k

Why this one: every shape depends only on the number of tokens (no `nonzero`, no boolean masks, no
per-expert token counts, no host sync), and the work is two plain GEMMs (`F.linear`, `bmm`) that
exist on every device and torch pin of the project: one code path for every graph backend (checked
on the CPU's SimNPUGraph). The price is running every expert: E/k times the work of exact routing.
Measured in suites/bench/test_moe_formulations.py (2 CPU cores): on the builtin tiny checkpoints
(4 experts, top-2) it is the fastest formulation for decode at bs 1 and 8 and for a 64-token
prefill. At Qwen1.5-MoE's 60 experts, top-4, sorting tokens by expert for a grouped matmul is an
order of magnitude faster at bs 1 and about 2x at bs 8 and in prefill; it is static too, but needs
`torch._grouped_mm` (CPU from torch 2.9, CUDA SM80+; on the NPU, torch_npu's own grouped matmul),
so it is the route for real checkpoints on a device that has it. Gathering each token's experts
(gpt-fast's `W13[topk_ids]` -> [T, k, 2I, H]) copies T*k expert matrices per step: it beats this
formulation only at bs 1 with many experts (3x), and is 2x slower at bs 8 and 10x or more in prefill.

Routing follows transformers op for op (`select_experts`), so that top-k ties break the same way. Each
block writes its router's own choice and top-k gap into the batch's `ExpertRouting`, and computes with
the experts it replays instead where the batch gives them (`replay_experts`): the judge's continuation
past a router near-tie. The replayed ids are one more static input, so a captured step replays them too.
Under tensor parallelism each rank holds every expert's slice of the intermediate dimension, like
the dense MLP, and the routed output is all-reduced. Under data parallelism the block runs DP
attention (`reference_runner/parallel/dp_attention.py`): it gathers every DP rank's tokens, shards the experts
over all tp * dp ranks, and hands each rank back its own rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reference_runner.engine.forward_batch import ForwardBatch
from reference_runner.models.config import ModelConfig
from reference_runner.models.layers import ReplicatedLinear, _param, check_shape, copy_weight
from reference_runner.models.llama import LlamaMLP
from reference_runner.parallel.collectives import all_reduce
from reference_runner.parallel.dp_attention import dp_gather, dp_scatter
from reference_runner.parallel.state import ParallelState, divide


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 routing weights [T, k] and expert ids [T, k] of the top-k experts, as transformers picks them."""
    # Softmax in float32 first, then topk on the probabilities, never on the logits: distinct logits
    # can round to equal probabilities, and equal values are ordered by torch.topk's own rule, so
    # only the same op on the same values picks the same experts as transformers.
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def replay_experts(router_logits: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                   replay_ids: torch.Tensor, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing with `replay_ids` [T, k] in place of the router's choice in the rows where they are >= 0,
    weighted by the router's own probabilities of the replayed experts; rows of -1 keep the router's choice."""
    replayed = replay_ids >= 0
    ids = torch.where(replayed, replay_ids, topk_ids)
    weights = torch.softmax(router_logits, dim=-1, dtype=torch.float32).gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return torch.where(replayed, weights, topk_weights), ids


def router_gap(router_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Float32 [T]: the router logit of each token's k-th expert minus that of its (k+1)-th (inf when every
    expert is chosen): how close the router came to another choice."""
    if router_logits.shape[-1] <= top_k:
        return torch.full_like(router_logits[:, 0], float("inf"), dtype=torch.float32)
    top = router_logits.float().topk(top_k + 1, dim=-1).values
    return top[:, -2] - top[:, -1]


class FusedMoE(nn.Module):
    """The experts of one layer stacked into [E, ...] tensors, in transformers' fused layout.

    `gate_up_proj` [E, 2 * I, H] (each expert's gate rows, then its up rows) and `down_proj`
    [E, H, I], with I this rank's share of the intermediate size. They load from per-expert
    checkpoint tensors (shard id `(expert, part)`) or from the fused tensors whole.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, parallel: ParallelState):
        super().__init__()
        self.parallel = parallel
        self.num_experts = num_experts
        self.intermediate_size = divide(intermediate_size, parallel.tp_size)
        self.gate_up_proj = _param(num_experts, 2 * self.intermediate_size, hidden_size)
        self.down_proj = _param(num_experts, hidden_size, self.intermediate_size)
        self.gate_up_proj.weight_loader = self.load_gate_up
        self.down_proj.weight_loader = self.load_down

    def load_gate_up(self, param: nn.Parameter, loaded_weight, shard_id: tuple[int, int] | None = None) -> None:
        """One expert's gate (part 0) or up (part 1) [I, H], or the fused [E, 2 * I, H] whole."""
        size, hidden = self.intermediate_size, param.shape[2]
        full = size * self.parallel.tp_size
        start = self.parallel.tp_rank * size
        if shard_id is not None:
            check_shape(loaded_weight, (full, hidden))
            expert, part = shard_id
            copy_weight(param.data[expert, part * size:(part + 1) * size], loaded_weight[start:start + size])
            return
        check_shape(loaded_weight, (self.num_experts, 2 * full, hidden))
        for part in (0, 1):
            rows = slice(part * full + start, part * full + start + size)
            copy_weight(param.data[:, part * size:(part + 1) * size], loaded_weight[:, rows])

    def load_down(self, param: nn.Parameter, loaded_weight, shard_id: tuple[int, int] | None = None) -> None:
        """One expert's down projection [H, I], or the fused [E, H, I] whole."""
        start = self.parallel.tp_rank * self.intermediate_size
        columns = slice(start, start + self.intermediate_size)
        expert_shape = (param.shape[1], self.intermediate_size * self.parallel.tp_size)
        if shard_id is not None:
            check_shape(loaded_weight, expert_shape)
            copy_weight(param.data[shard_id[0]], loaded_weight[:, columns])
        else:
            check_shape(loaded_weight, (self.num_experts, *expert_shape))
            copy_weight(param.data, loaded_weight[:, :, columns])

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """x [T, H] through its top-k experts, weighted: [T, H]."""
        # transformers multiplies expert outputs by the weights in the model dtype (Qwen2-MoE casts the
        # weights first; Mixtral rounds the float32 product back), then sums over the experts.
        weights = x.new_zeros(x.shape[0], self.num_experts).scatter_(1, topk_ids, topk_weights.to(x.dtype))
        gate_up = F.linear(x, self.gate_up_proj.flatten(0, 1)).unflatten(-1, (self.num_experts, -1))
        gate, up = gate_up.chunk(2, dim=-1)
        y = torch.bmm((F.silu(gate) * up).transpose(0, 1), self.down_proj.transpose(1, 2))  # [E, T, H]
        out = (y * weights.t().unsqueeze(-1)).sum(0)
        return all_reduce(out, self.parallel)


class SparseMoeBlock(nn.Module):
    """Router, routed experts and, as in Qwen2-MoE, an optional shared expert behind a sigmoid gate."""

    def __init__(self, config: ModelConfig, parallel: ParallelState, *, moe_index: int, num_experts: int, top_k: int,
                 intermediate_size: int, renormalize: bool, shared_expert_intermediate_size: int = 0):
        super().__init__()
        self.parallel = parallel
        self.moe_index = moe_index  # among the model's MoE layers: its column of the batch's ExpertRouting
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.gate = ReplicatedLinear(config.hidden_size, num_experts)
        moe_parallel = parallel.moe_state()
        self.experts = FusedMoE(num_experts, config.hidden_size, intermediate_size, moe_parallel)
        self.shared_expert = None
        if shared_expert_intermediate_size:
            self.shared_expert = LlamaMLP(config, moe_parallel, shared_expert_intermediate_size)
            self.shared_expert_gate = ReplicatedLinear(config.hidden_size, 1)

    def select_experts(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This block's routing of router logits [T, E]: float32 weights and expert ids, [T, top_k] each."""
        return select_experts(router_logits, self.top_k, self.renormalize)

    def forward(self, x: torch.Tensor, forward_batch: ForwardBatch | None = None) -> torch.Tensor:
        num_tokens = x.shape[0]
        x = dp_gather(x, self.parallel)
        router_logits = self.gate(x)
        topk_weights, topk_ids = self.select_experts(router_logits)
        routing = forward_batch.routing if forward_batch is not None else None
        if routing is not None:
            layer = self.moe_index
            routing.topk_ids[:, layer].copy_(dp_scatter(topk_ids, self.parallel, num_tokens))
            routing.gaps[:, layer].copy_(dp_scatter(router_gap(router_logits, self.top_k), self.parallel, num_tokens))
            replay = dp_gather(routing.replay_ids[:, layer], self.parallel)
            topk_weights, topk_ids = replay_experts(router_logits, topk_weights, topk_ids, replay, self.renormalize)
        out = self.experts(x, topk_weights, topk_ids)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return dp_scatter(out, self.parallel, num_tokens)


def expert_params_mapping(prefix: str, num_experts: int, gate: str, up: str, down: str) -> list[tuple[str, str, tuple]]:
    """Loader entries from per-expert checkpoint tensors `{prefix}.experts.{e}.{gate,up,down}.weight`
    to the stacked `.mlp.experts.gate_up_proj` / `.mlp.experts.down_proj` (shard id `(expert, part)`)."""
    parts = [(gate, "gate_up_proj", 0), (up, "gate_up_proj", 1), (down, "down_proj", 0)]
    return [(f"{prefix}.experts.{e}.{name}.weight", f".mlp.experts.{param}", (e, part))
            for e in range(num_experts) for name, param, part in parts]
