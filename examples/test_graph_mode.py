"""Judge graph mode from your own test suite: the `npugraph` fixture comes with npugraph-harness (a pytest plugin).

    python -m pytest examples/

`npugraph.check` takes the options of `npugraph-harness check` by the names of their flags; point `model` at your
checkpoint directory and `target` at your engine (`sglang`, `vllm`, or one you register).
"""


def test_graph_mode_changes_no_token(npugraph):
    npugraph.check(model="llama", modes=["eager", "graph"], max_new_tokens=16).assert_passed()
