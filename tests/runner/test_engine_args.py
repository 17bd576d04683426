"""EngineArgs: the engine's options, declared once, validated, and carried as JSON to launched ranks."""
import json

import pytest

from reference_runner.engine.args import EngineArgs


def test_a_json_round_trip_gives_the_same_args():
    args = EngineArgs(mode="compile", dtype="float16", graph_bs=(1, 3), tp_size=2)
    assert EngineArgs.from_dict(json.loads(json.dumps(args.as_dict()))) == args


@pytest.mark.parametrize(("field", "value", "message"), [
    ("mode", "turbo", "mode 'turbo' is not one of eager, graph, compile, tree, compile_nograph"),
    ("dtype", "int8", "dtype 'int8' is not one of float32, bfloat16, float16"),
])
def test_unknown_mode_or_dtype_is_refused(field, value, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        EngineArgs(**{field: value})
