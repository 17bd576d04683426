"""Engine: continuous batching with greedy sampling over a ModelRunner.

Each step prefills the requests the `Scheduler` admits (eagerly, or replaying a prefill graph where prefill graphs
are on: `graphs/prefill.py`; that gives their first token), then
runs one decode step over every running request that still needs tokens; finished requests free their
KV blocks. Like SGLang's overlap scheduler, the next tokens
are taken (argmax, on the device) at once, but a step's logits are read on the host (log_softmax,
top-k, `.tolist()`) only after the next step's forwards have been launched. A graph runner that
returns views of its static output buffers instead of copies is therefore caught.

A request may be forced (`Request.forced_from`): from that step on the token fed back is the request's,
not the argmax, while the top-k recorded stays the engine's own; only the input ids that later steps
write into the graph's static buffers change. MoE models record every router's own choice per fed
token, and compute with the experts a request replays (`Request.forced_experts`) where it gives them.

Under TP every rank of a TP group runs the same requests and schedule. Under DP each DP rank runs
its own requests, and every step the ranks exchange their token counts: all of them run a prefill
if any rank prefills and a decode if any rank decodes (a rank without work runs an empty, padded
one), so the collectives of DP attention always pair up, and all pad to the same graph bucket.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from reference_runner.device import resolve_device
from reference_runner.engine.args import EngineArgs
from reference_runner.engine.forward_batch import ExpertRouting, ForwardBatch, ForwardMode, decode_batch
from reference_runner.engine.model_runner import ModelRunner
from reference_runner.engine.scheduler import Running, ScheduledBatch, Scheduler
from reference_runner.errors import InvalidRequest, LayoutError
from reference_runner.graphs import get_graph_backend
from reference_runner.graphs.prefill import PrefillGraphs
from reference_runner.graphs.runner import GraphRunner, GraphStats, get_capture_bs, make_graph_runner
from reference_runner.models.loader import keep_model
from reference_runner.parallel.state import ParallelState
from reference_runner.records import Generation, Request


@dataclass
class _StepOutput:
    """A forward's results, kept on the device until the host reads them."""

    logits: torch.Tensor
    next_ids: torch.Tensor
    reqs: list[Running]
    in_graph: bool
    routing: ExpertRouting | None = None  # MoE: the routers' own choices for the tokens fed
    fed: list[int] | None = None  # tokens each request fed (rows of `routing`): its prompt in a prefill, else 1


class Engine:
    """Greedy generation for a checkpoint directory; decode runs eager or replays device graphs."""

    def __init__(self, model: str | Path, args: EngineArgs | None = None, *, device: str = "cpu",
                 parallel: ParallelState | None = None):
        self.args = args = args or EngineArgs()
        self.device = resolve_device(device)
        self.parallel = parallel or ParallelState()
        if (self.parallel.tp_size, self.parallel.dp_size) != (args.tp_size, args.dp_size):
            raise LayoutError(f"engine args ask for tp {args.tp_size} x dp {args.dp_size}, but this rank's parallel "
                              f"state is tp {self.parallel.tp_size} x dp {self.parallel.dp_size}")
        num_blocks = args.kv_num_blocks()
        if num_blocks < args.blocks_per_seq + 1:
            raise ValueError(f"num_blocks {num_blocks} cannot hold one request of max_context {args.max_context}")
        self.model_runner = ModelRunner(model, device=self.device, dtype=getattr(torch, args.dtype),
                                        max_context=args.max_context, block_size=args.block_size,
                                        num_blocks=num_blocks, parallel=self.parallel)
        self.kv_cache = self.model_runner.kv_cache
        self.stats = GraphStats()
        self.graph_families: list[GraphRunner] = []  # in capture order, sharing one pool
        if args.prefill_graphs:
            self.model_runner.prefill_graphs = PrefillGraphs(self.model_runner, args.max_context)
        self.capture_seconds = 0.0  # capturing (and in compile mode compiling) every graph family
        if args.mode == "compile_nograph":  # compiled at its first decode step: no capture
            self.model_runner.compiled_step = get_graph_backend(self.device, args.mode).compiled_step(
                self.model_runner.forward_eager)
            self.model_runner.compiled_max_bs = get_capture_bs(args.max_bs, args.graph_bs)[-1]
        elif args.mode != "eager":
            start = time.perf_counter()
            self._capture_graphs()
            self.capture_seconds = time.perf_counter() - start

    def release(self) -> None:
        """Done with this engine: its model may serve the next engine of the process (`models/loader.py`)."""
        keep_model(self.model_runner.model)

    def _capture_graphs(self) -> None:
        """Capture each family of graphs, the one with the largest graph first (its pool memory is then reused by
        the other), into one pool."""
        args, model_runner = self.args, self.model_runner
        prefill = model_runner.prefill_graphs

        def decode(pool=None) -> GraphRunner:
            model_runner.graph_runner = make_graph_runner(model_runner, args.max_bs, args.graph_bs, args.mode,
                                                          args.replay_timeout_s, pool=pool)
            return model_runner.graph_runner

        def prefill_family(pool=None) -> GraphRunner:
            return prefill.capture(args.mode, args.replay_timeout_s, pool)

        order = [decode] if prefill is None else [prefill_family, decode] if prefill.max_tokens > args.max_bs else [
            decode, prefill_family]
        for capture in order:
            self.graph_families.append(capture(self.graph_families[0].pool if self.graph_families else None))

    def validate(self, request: Request) -> None:
        """Raise `InvalidRequest` naming the request and the problem if it cannot be served."""
        rid, prompt = request.rid, request.prompt_ids
        vocab, max_context = self.model_runner.vocab_size, self.args.max_context
        if not prompt:
            raise InvalidRequest(f"request {rid!r}: empty prompt")
        if request.max_new_tokens < 1:
            raise InvalidRequest(f"request {rid!r}: max_new_tokens must be >= 1, got {request.max_new_tokens}")
        if request.arrival_step < 0:
            raise InvalidRequest(f"request {rid!r}: arrival_step must be >= 0, got {request.arrival_step}")
        if len(prompt) + request.max_new_tokens > max_context:
            raise InvalidRequest(f"request {rid!r}: prompt of {len(prompt)} tokens + max_new_tokens "
                                 f"{request.max_new_tokens} exceeds max_context {max_context}")
        _check_ids(rid, prompt, vocab, "prompt position")
        if request.forced_from is not None:
            if not 0 <= request.forced_from <= request.max_new_tokens:
                raise InvalidRequest(f"request {rid!r}: forced_from {request.forced_from} is outside "
                                     f"0..max_new_tokens ({request.max_new_tokens})")
            if len(request.forced_ids) != request.max_new_tokens - request.forced_from:
                raise InvalidRequest(f"request {rid!r}: {len(request.forced_ids)} forced_ids for steps "
                                     f"{request.forced_from}..{request.max_new_tokens - 1}")
            _check_ids(rid, request.forced_ids, vocab, "forced step", first=request.forced_from)
        elif request.forced_ids:
            raise InvalidRequest(f"request {rid!r}: forced_ids without forced_from")
        if request.forced_experts:
            self._validate_forced_experts(request)

    def _validate_forced_experts(self, request: Request) -> None:
        rid, shape = request.rid, self.model_runner.routing_shape
        if shape is None:
            raise InvalidRequest(f"request {rid!r}: forced_experts for a model without MoE layers")
        fed = len(request.prompt_ids) + request.max_new_tokens - 1
        if len(request.forced_experts) > fed:
            raise InvalidRequest(f"request {rid!r}: forced_experts for {len(request.forced_experts)} positions, "
                                 f"but it feeds {fed}")
        moe_layers, top_k, num_experts = shape
        for position, layers in enumerate(request.forced_experts):
            if len(layers) != moe_layers or any(
                    len(set(ids)) != top_k or len(ids) != top_k
                    or not all(isinstance(e, int) and 0 <= e < num_experts for e in ids) for ids in layers):
                raise InvalidRequest(f"request {rid!r}: forced_experts at position {position} must be {moe_layers} "
                                     f"MoE layers of {top_k} distinct expert ids in [0, {num_experts}), got {layers}")

    def generate(self, requests: list[Request]) -> list[Generation]:
        """Greedy-decode `requests`, exactly `max_new_tokens` each; results in request order.

        Invalid requests come back with `error` set; the others still run.
        """
        gens = [Generation(r.rid) for r in requests]
        first_index: dict[str, int] = {}
        valid = []
        for i, (req, gen) in enumerate(zip(requests, gens)):
            try:
                if req.rid in first_index:
                    raise InvalidRequest(f"request {req.rid!r}: duplicate rid (also request #{first_index[req.rid]})")
                first_index[req.rid] = i
                self.validate(req)
            except InvalidRequest as e:
                gen.error = str(e)
                continue
            gen.forced_from = req.forced_from
            valid.append(Running(req, gen))
        with torch.no_grad():
            self._run(Scheduler(valid, self.kv_cache, self.parallel, self.device))
        return gens

    def _run(self, scheduler: Scheduler) -> None:
        pending: list[_StepOutput] = []
        while (prefill := scheduler.next_prefill(results_pending=bool(pending))) is not None:
            outputs = []
            if prefill.reqs:
                outputs.append(self._prefill(prefill))
            elif prefill.idle:
                self.model_runner.forward_eager(self._idle_batch(prefill.global_sizes))
            decode = scheduler.next_decode()
            if decode.reqs:
                outputs.append(self._decode(decode))
            elif decode.idle:  # in a graph: the bucket the other DP ranks replay
                self.model_runner.forward(self._idle_batch(decode.global_sizes))
            # Overlap: the previous step's results are read only now, after this step's forwards.
            for out in pending:
                self._process(out)
            pending = outputs
            scheduler.finish_step()

    def _prefill(self, prefill: ScheduledBatch) -> _StepOutput:
        kv, device, reqs = self.kv_cache, self.device, prefill.reqs
        lens = [len(r.req.prompt_ids) for r in reqs]
        slots = []
        for r, n in zip(reqs, lens):
            kv.reserve(r.req.rid, n)
            slots += kv.slots(r.req.rid, 0, n)
        batch = ForwardBatch(
            forward_mode=ForwardMode.EXTEND,
            batch_size=len(reqs),
            input_ids=torch.tensor([t for r in reqs for t in r.req.prompt_ids], device=device),
            positions=torch.tensor([p for n in lens for p in range(n)], device=device),
            out_cache_loc=torch.tensor(slots, dtype=kv.slot_dtype, device=device),
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
            seq_lens_cpu=lens,
            block_tables=kv.block_table_tensor([r.req.rid for r in reqs], device),
            extend_seq_lens=lens,
            global_num_tokens=prefill.global_sizes,
            routing=self._routing([(r, range(n)) for r, n in zip(reqs, lens)]),
        )
        return self._sample(batch, reqs, fed=lens)

    def _decode(self, decode: ScheduledBatch) -> _StepOutput:
        reqs = decode.reqs
        routing = self._routing([(r, [r.seq_len - 1]) for r in reqs])
        batch = decode_batch(self.kv_cache, [r.req.rid for r in reqs], [r.seq_len for r in reqs],
                             self._last_token_ids(reqs), decode.global_sizes, routing)
        return self._sample(batch, reqs, fed=[1] * len(reqs))

    def _routing(self, fed: list[tuple[Running, range | list[int]]]) -> ExpertRouting | None:
        """Routing buffers for the positions each request feeds, replaying the experts it forces there."""
        routing = self.model_runner.own_routing(sum(len(positions) for _, positions in fed))
        if routing is None or not any(r.req.forced_experts for r, _ in fed):
            return routing
        moe_layers, top_k, _ = self.model_runner.routing_shape
        own = [[-1] * top_k] * moe_layers
        rows = [r.req.forced_experts[p] if p < len(r.req.forced_experts) else own for r, positions in fed for p in positions]
        routing.replay_ids.copy_(torch.tensor(rows, dtype=torch.int64))
        return routing

    def _idle_batch(self, global_num_tokens: list[int]) -> ForwardBatch:
        """A decode batch of no request, for a DP rank that has nothing to run while others do
        (SGLang's idle batch): it joins their collectives with padding rows only."""
        kv, device = self.kv_cache, self.device
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return ForwardBatch(
            forward_mode=ForwardMode.DECODE,
            batch_size=0,
            input_ids=empty,
            positions=empty,
            out_cache_loc=empty.to(kv.slot_dtype),
            seq_lens=empty.to(torch.int32),
            seq_lens_cpu=[],
            block_tables=torch.zeros(0, kv.max_blocks_per_seq, dtype=torch.int32, device=device),
            global_num_tokens=global_num_tokens,
            routing=self.model_runner.own_routing(0),  # DP: MoE layers gather the replayed experts of every rank
        )

    def _last_token_ids(self, reqs: list[Running]) -> torch.Tensor:
        # The newest tokens are still on the device (not read back yet): gather them from the tensors
        # of the steps that sampled them, one index_select per source tensor.
        parts = []
        for _, group in itertools.groupby(reqs, key=lambda r: id(r.last_ids)):
            group = list(group)
            rows = torch.tensor([r.last_row for r in group], device=self.device)
            parts.append(group[0].last_ids.index_select(0, rows))
        return torch.cat(parts)

    def _sample(self, batch: ForwardBatch, reqs: list[Running], fed: list[int]) -> _StepOutput:
        logits, in_graph = self.model_runner.forward(batch)
        if batch.forward_mode is ForwardMode.DECODE or self.model_runner.prefill_graphs is not None:
            self._count(batch, in_graph)
        next_ids = logits.argmax(-1)
        forced = [(row, token) for row, r in enumerate(reqs) if (token := r.forced_token) is not None]
        if forced:
            rows, tokens = zip(*forced)
            next_ids = next_ids.index_put((torch.tensor(rows, device=self.device),), torch.tensor(tokens, device=self.device))
        for row, r in enumerate(reqs):
            r.num_tokens += 1
            r.last_ids, r.last_row = next_ids, row
        return _StepOutput(logits, next_ids, reqs, in_graph, batch.routing, fed)

    def _count(self, batch: ForwardBatch, in_graph: bool) -> None:
        """Count a decode step, or a prefill where prefill graphs are on, and why it ran eagerly in a graph mode."""
        decode = batch.forward_mode is ForwardMode.DECODE
        graphs = self.model_runner.graph_runner if decode else self.model_runner.prefill_graphs
        counter = f"{'' if decode else 'prefill_'}{'graph' if in_graph else 'eager'}_steps"
        setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        if not in_graph and graphs is not None and (decode or graphs.runner is not None):
            self.stats.fallback_reasons[graphs.fallback_reason(batch) or graphs.replay_fallback] += 1

    def graph_memory(self) -> dict[str, int] | None:
        """Bytes held by the captured graphs, None in eager mode: the largest size alone vs all sizes, or with
        prefill graphs, the largest family alone (captured first, into a fresh pool) vs all families in the pool."""
        families = self.graph_families
        if not families:
            return None
        if len(families) == 1:
            return families[0].memory_report()
        return {"largest_family_bytes": families[0].family_bytes,
                "all_families_bytes": families[-1].pool_bytes() + sum(f.static_bytes() for f in families)}

    def _process(self, out: _StepOutput) -> None:
        top = torch.log_softmax(out.logits, dim=-1).topk(min(self.args.top_k, out.logits.shape[-1]), dim=-1)
        rows = zip(out.reqs, out.next_ids.tolist(), top.indices.tolist(), top.values.tolist())
        for r, token, ids, logprobs in rows:
            r.gen.append(token, list(zip(ids, logprobs)), out.in_graph)
        if out.routing is not None:
            experts, gaps, start = out.routing.topk_ids.tolist(), out.routing.gaps.tolist(), 0
            for r, n in zip(out.reqs, out.fed):
                r.gen.routed_experts.append(experts[start:start + n])
                r.gen.router_gaps.append(gaps[start:start + n])
                start += n


def _check_ids(rid: str, ids: list[int], vocab: int, where: str, first: int = 0) -> None:
    for i, t in enumerate(ids, first):
        if not isinstance(t, int):
            raise InvalidRequest(f"request {rid!r}: token id {t!r} at {where} {i} is not an int")
        if not 0 <= t < vocab:
            raise InvalidRequest(f"request {rid!r}: token id {t} at {where} {i} is outside the vocabulary [0, {vocab})")
