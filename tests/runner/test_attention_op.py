"""The paged decode op (FIA's host-list contract) and the causal prefill op against dense references."""
import math

import pytest
import torch

from reference_runner.attention.ops import paged_attention, prefill_attention

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 4, 2, 8, 4
SCALE = HEAD_DIM ** -0.5


def dense_attention(q, k, v):
    """q [heads, d] over k, v [len, kv_heads, d], GQA by repeating kv heads."""
    k = k.repeat_interleave(HEADS // KV_HEADS, dim=1)
    v = v.repeat_interleave(HEADS // KV_HEADS, dim=1)
    probs = torch.einsum("hd,shd->hs", q, k).mul(SCALE).softmax(-1)
    return torch.einsum("hs,shd->hd", probs, v)


def paged_case(lens, num_blocks=32, max_blocks=6, seed=0):
    """Random caches and a block table giving each row its own scattered blocks; dense K/V per row."""
    g = torch.Generator().manual_seed(seed)
    key_cache = torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, generator=g)
    value_cache = torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, generator=g)
    free = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()  # block 0 stays the dummy block
    table = torch.zeros(len(lens), max_blocks, dtype=torch.int32)
    dense = []
    for row, n in enumerate(lens):
        blocks = [free.pop() for _ in range(math.ceil(n / BLOCK))]
        table[row, : len(blocks)] = torch.tensor(blocks)
        slots = [blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(n)]
        dense.append((key_cache.flatten(0, 1)[slots], value_cache.flatten(0, 1)[slots]))
    query = torch.randn(len(lens), HEADS, HEAD_DIM, generator=g)
    return query, key_cache, value_cache, table, dense


def call(query, key_cache, value_cache, table, lens):
    return torch.ops.npugraph.paged_attention(
        query, key_cache, value_cache, table, actual_seq_lengths_kv=lens, num_heads=HEADS,
        num_key_value_heads=KV_HEADS, scale=SCALE, block_size=BLOCK)


@pytest.mark.parametrize("lens", [[1], [4, 5, 9, 1, 24], [3, 0, 8]], ids=["one", "block-boundaries", "padded-row"])
def test_paged_attention_matches_dense_attention(lens):
    query, key_cache, value_cache, table, dense = paged_case(lens)
    out = call(query, key_cache, value_cache, table, lens)
    assert out.shape == query.shape
    for row, (n, (k, v)) in enumerate(zip(lens, dense)):
        expected = dense_attention(query[row], k, v) if n else torch.full((HEADS, HEAD_DIM), float("nan"))
        torch.testing.assert_close(out[row], expected, atol=1e-5, rtol=1e-5, equal_nan=True)


def test_padded_rows_and_unused_slots_never_leak_into_real_rows():
    # The dummy block 0 may hold anything (padded rows write there), even NaN; a padded row's own output is
    # FIA's unspecified row, NaN here (the attention backends zero it).
    lens = [5, 0]
    query, key_cache, value_cache, table, dense = paged_case(lens)
    key_cache[0] = float("nan")
    value_cache[0] = float("nan")
    out = call(query, key_cache, value_cache, table, lens)
    torch.testing.assert_close(out[0], dense_attention(query[0], *dense[0]), atol=1e-5, rtol=1e-5)
    assert out[1].isnan().all()


def test_lengths_come_from_the_host_list_at_call_time():
    query, key_cache, value_cache, table, dense = paged_case([9])
    shorter = call(query, key_cache, value_cache, table, [3])
    k, v = dense[0]
    torch.testing.assert_close(shorter[0], dense_attention(query[0], k[:3], v[:3]), atol=1e-5, rtol=1e-5)


def test_keeps_the_query_dtype():
    query, key_cache, value_cache, table, _ = paged_case([6, 2])
    out = call(query.bfloat16(), key_cache.bfloat16(), value_cache.bfloat16(), table, [6, 2])
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), call(query, key_cache, value_cache, table, [6, 2]), atol=3e-2, rtol=3e-2)


def test_bad_host_lists_raise():
    query, key_cache, value_cache, table, _ = paged_case([4, 4])
    with pytest.raises(ValueError, match="has 1 entries for a batch of 2"):
        call(query, key_cache, value_cache, table, [4])
    with pytest.raises(ValueError, match="exceeds block_table capacity 24"):
        call(query, key_cache, value_cache, table, [4, 25])


def test_op_registration_passes_opcheck():
    # Schema, fake (meta) implementation and dispatch behave as torch expects of a custom op. No row of length
    # 0: its NaN never equals itself in opcheck's comparison of eager and traced outputs.
    query, key_cache, value_cache, table, _ = paged_case([5, 1, 12])
    kwargs = {"actual_seq_lengths_kv": [5, 1, 12], "num_heads": HEADS, "num_key_value_heads": KV_HEADS,
              "scale": SCALE, "block_size": BLOCK}
    torch.library.opcheck(paged_attention, (query, key_cache, value_cache, table), kwargs)


def test_prefill_attention_is_causal_within_each_request():
    g = torch.Generator().manual_seed(1)
    lens = [1, 5, 9]
    q = torch.randn(sum(lens), HEADS, HEAD_DIM, generator=g)
    k = torch.randn(sum(lens), KV_HEADS, HEAD_DIM, generator=g)
    v = torch.randn(sum(lens), KV_HEADS, HEAD_DIM, generator=g)
    out = prefill_attention(q, k, v, lens, SCALE)
    start = 0
    for n in lens:
        for i in range(n):
            t = start + i
            expected = dense_attention(q[t], k[start:t + 1], v[start:t + 1])
            torch.testing.assert_close(out[t], expected, atol=1e-5, rtol=1e-5)
        start += n
