"""The stand-ins SGLang's CPU worker gets for what PyPI lacks (`harness/targets/sglang_cpu`): the pure-torch
`assign_req_to_token_pool_cpu` against its specification (the triton kernel `assign_req_to_token_pool` of sglang
0.5.23's `srt/mem_cache/allocation.py`), any other `sgl_kernel` op failing by name, and a torchvision that SGLang can
import but transformers does not take for one."""
import json
import os
import subprocess
import sys

import pytest
import torch

from harness.targets.sglang_cpu import STARTUP_DIR
from harness.targets.sglang_cpu.sgl_kernel import MissingOp, assign_req_to_token_pool_cpu

POOL_LEN = 8


def table(rows: int = 4) -> torch.Tensor:
    return torch.full((rows, POOL_LEN), -1, dtype=torch.int32)


def assign(req_pool_indices, start_offset, end_offset, out_cache_loc, req_to_token):
    as_tensor = lambda values: torch.tensor(values, dtype=torch.int64)  # noqa: E731
    assign_req_to_token_pool_cpu(as_tensor(req_pool_indices), req_to_token, as_tensor(start_offset), as_tensor(end_offset),
                                 as_tensor(out_cache_loc), POOL_LEN)
    return req_to_token


def test_each_request_gets_its_slice_of_out_cache_loc_in_its_own_row_from_its_start_offset():
    req_to_token = assign([2, 0, 3], [0, 3, 5], [2, 4, 8], [10, 11, 12, 13, 14, 15], table())
    assert req_to_token.tolist() == [
        [-1, -1, -1, 12, -1, -1, -1, -1],  # request 1: slot 12 at column 3
        [-1] * 8,  # no request
        [10, 11, -1, -1, -1, -1, -1, -1],  # request 0: slots 10, 11 at columns 0, 1
        [-1, -1, -1, -1, -1, 13, 14, 15],  # request 2: the last three slots, up to the row's end
    ]


def test_an_empty_range_writes_nothing_and_takes_no_slot():
    req_to_token = assign([1, 0, 2], [4, 2, 0], [4, 4, 1], [20, 21, 22], table())
    assert req_to_token[1].tolist() == [-1] * 8
    assert req_to_token[0].tolist() == [-1, -1, 20, 21, -1, -1, -1, -1]
    assert req_to_token[2].tolist() == [22, -1, -1, -1, -1, -1, -1, -1]


def test_a_decode_step_writes_one_slot_per_request_after_what_it_holds():
    req_to_token = assign([0, 1], [0, 0], [3, 2], [1, 2, 3, 4, 5], table())
    req_to_token = assign([0, 1], [3, 2], [4, 3], [6, 7], req_to_token)
    assert req_to_token[:2, :4].tolist() == [[1, 2, 3, 6], [4, 5, 7, -1]]


@pytest.mark.parametrize(("start", "end", "slots", "message"), [
    ([2], [1], [9], r"columns \[2, 1\) of row 0 do not lie in \[0, 8\]"),
    ([6], [9], [9, 9, 9], r"columns \[6, 9\) of row 0 do not lie in \[0, 8\]"),
    ([0], [3], [9, 9], "the requests take 3 slots, out_cache_loc has 2"),
], ids=["end before start", "beyond the row", "too few slots"])
def test_a_request_outside_its_row_or_the_slots_is_refused_before_anything_is_written(start, end, slots, message):
    req_to_token = table()
    with pytest.raises(ValueError, match=f"^assign_req_to_token_pool_cpu: {message}"):
        assign([0], start, end, slots, req_to_token)
    assert (req_to_token == -1).all()


def test_any_other_op_imports_and_fails_naming_itself_when_called():
    from harness.targets.sglang_cpu.sgl_kernel import fused_experts_cpu  # as sglang imports its CPU ops

    with pytest.raises(MissingOp, match=r"^sgl_kernel.fused_experts_cpu is not implemented here: sgl_kernel's CPU "
                                        r"build is not on PyPI"):
        fused_experts_cpu(torch.zeros(1))


def test_startup_gives_sglang_the_stand_ins_and_transformers_no_torchvision():
    # A process started as SGLang's CPU worker starts its processes: the startup directory first on its path.
    code = """if True:
        import json, sys
        import sgl_kernel, torchvision.transforms as T
        from torchvision.transforms.functional import InterpolationMode
        from transformers import AutoProcessor  # what sglang imports next to torchvision
        from transformers.utils.import_utils import is_torchvision_available
        try:
            T.Compose([])
        except ImportError as error:
            used = str(error)
        print(json.dumps({"op": sgl_kernel.assign_req_to_token_pool_cpu.__module__, "used": used,
                          "torchvision": is_torchvision_available()}))
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(STARTUP_DIR), *sys.path])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == {
        "op": "harness.targets.sglang_cpu.sgl_kernel",
        "used": "torchvision.transforms.Compose: torchvision is not installed here (PyPI's build needs CUDA); "
                "npugraph-harness's stand-in only lets SGLang import its image-model modules",
        "torchvision": False,
    }
