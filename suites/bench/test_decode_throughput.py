"""Decode throughput per model, mode and batch size: one decode step, and a whole 32-token generate
call with Hugging Face `generate` on the same checkpoint and prompts as the peer.

Every mode's speed-up is measured against the same workload on the eager engine, interleaved
(see the `measure` fixture); the graph modes first check that they really replay a graph.
"""
import pytest
import torch

from reference_runner.records import Request

MODELS = ["llama", "qwen2_moe"]
BATCH_SIZES = [1, 8, 32]
NEW_TOKENS = 32


@pytest.mark.parametrize("mode", ["eager", "graph", "compile"])
@pytest.mark.parametrize("bs", BATCH_SIZES)
@pytest.mark.parametrize("model", MODELS)
def test_decode_step(measure, engines, decode_step, model, bs, mode):
    with decode_step(engines(model, mode), bs, "run") as step, decode_step(engines(model, "eager"), bs, "ref") as eager:
        with torch.no_grad():
            _, in_graph = step()
        assert in_graph == (mode != "eager"), "a graph mode that falls back to eager would time eager"
        measure(step, eager=None if mode == "eager" else eager, model=model, kind="step", mode=mode, bs=bs, tokens=bs)


@pytest.mark.parametrize("mode", ["eager", "graph", "compile", "hf"])
@pytest.mark.parametrize("bs", BATCH_SIZES)
@pytest.mark.parametrize("model", MODELS)
def test_decode_loop(measure, engines, hf_models, bench_prompts, device, model, bs, mode):
    eager_engine = engines(model, "eager")
    vocab_size = eager_engine.model_runner.vocab_size
    reqs = [Request(f"bench{i}", prompt, NEW_TOKENS) for i, prompt in enumerate(bench_prompts(bs, vocab_size))]
    if mode == "hf":
        hf = hf_models(model)
        input_ids = torch.tensor([r.prompt_ids for r in reqs], device=device)
        # Greedy, exactly NEW_TOKENS tokens (EOS suppressed), as the engine decodes.
        kwargs = dict(attention_mask=torch.ones_like(input_ids), max_new_tokens=NEW_TOKENS,
                      min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        assert hf.generate(input_ids, **kwargs).shape == (bs, input_ids.shape[1] + NEW_TOKENS)
        run = lambda: hf.generate(input_ids, **kwargs)  # noqa: E731
    else:
        engine = engines(model, mode)
        graph_steps = engine.stats.graph_steps
        assert all(len(g.output_ids) == NEW_TOKENS for g in engine.generate(reqs))
        assert (engine.stats.graph_steps > graph_steps) == (mode != "eager")
        run = lambda: engine.generate(reqs)  # noqa: E731
    eager = None if mode == "eager" else lambda: eager_engine.generate(reqs)
    measure(run, eager=eager, model=model, kind="loop", mode=mode, bs=bs, tokens=bs * NEW_TOKENS)
