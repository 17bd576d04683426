"""Bad requests are refused at the API boundary with a message naming the culprit; the rest of a batch still runs.
(Bad checkpoints: test_checkpoint_validation.py.)"""
import re

import pytest

from harness.inputs.checkpoints import ensure_checkpoint
from reference_runner.engine.args import EngineArgs
from reference_runner.engine.engine import Engine
from reference_runner.errors import InvalidRequest
from reference_runner.records import Request

MAX_CONTEXT = 64


@pytest.fixture(scope="module")
def engine():
    return Engine(ensure_checkpoint("llama"), EngineArgs(block_size=8, max_context=MAX_CONTEXT))


# --- requests ------------------------------------------------------------------------------------

BAD_REQUESTS = [
    (Request("empty", [], 4), "request 'empty': empty prompt"),
    (Request("long", [1] * 60, 5), "request 'long': prompt of 60 tokens + max_new_tokens 5 exceeds max_context 64"),
    (Request("vocab", [1, 512], 4), "request 'vocab': token id 512 at prompt position 1 is outside the vocabulary"),
    (Request("negative", [-1], 4), "request 'negative': token id -1 at prompt position 0 is outside the vocabulary"),
    (Request("float", [1, 2.0], 4), "request 'float': token id 2.0 at prompt position 1 is not an int"),
    (Request("zero", [1, 2], 0), "request 'zero': max_new_tokens must be >= 1, got 0"),
    (Request("early", [1, 2], 3, arrival_step=-1), "request 'early': arrival_step must be >= 0, got -1"),
    (Request("forced late", [1], 4, forced_from=5), "request 'forced late': forced_from 5 is outside 0..max_new_tokens (4)"),
    (Request("forced count", [1], 4, forced_from=1, forced_ids=[7, 7]),
     "request 'forced count': 2 forced_ids for steps 1..3"),
    (Request("forced vocab", [1], 3, forced_from=1, forced_ids=[7, 512]),
     "request 'forced vocab': token id 512 at forced step 2 is outside the vocabulary"),
    (Request("forced unanchored", [1], 2, forced_ids=[7, 7]), "request 'forced unanchored': forced_ids without forced_from"),
    (Request("forced experts", [1], 2, forced_experts=[[[0, 1]]]),
     "request 'forced experts': forced_experts for a model without MoE layers"),
]


@pytest.mark.parametrize("request_, message", BAD_REQUESTS, ids=[r.rid for r, _ in BAD_REQUESTS])
def test_validate_raises_invalid_request(engine, request_, message):
    with pytest.raises(InvalidRequest, match=re.escape(message)) as info:
        engine.validate(request_)
    assert isinstance(info.value, ValueError)


def test_a_request_that_just_fits_is_valid(engine):
    engine.validate(Request("fits", [1] * 60, 4))


def test_invalid_requests_come_back_with_errors_and_the_batch_still_runs(engine):
    good = [Request("a", [3, 4, 5], 6), Request("b", list(range(10, 30)), 5, arrival_step=2)]
    alone = engine.generate([Request(r.rid, r.prompt_ids, r.max_new_tokens) for r in good])
    duplicate = Request("a", [7], 2)
    batch = [BAD_REQUESTS[0][0], good[0], *(r for r, _ in BAD_REQUESTS[1:]), duplicate, good[1]]
    generations = engine.generate(batch)
    assert [g.rid for g in generations] == [r.rid for r in batch]
    errors = {g.rid: g.error for g in generations if g.error}
    for request, message in BAD_REQUESTS:
        assert errors[request.rid].startswith(message)
    assert generations[-2].error == "request 'a': duplicate rid (also request #1)"
    assert [g.output_ids for g in generations if g.error is None] == [g.output_ids for g in alone]
    assert all(not g.output_ids for g in generations if g.error)
