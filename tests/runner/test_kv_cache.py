"""Paged KV cache: block 0 reserved, slot mapping, block tables that grow and are freed."""
import pytest
import torch

from reference_runner.engine.kv_cache import BlockAllocator, KVCache, OutOfBlocks


def make_cache(num_blocks=8, block_size=4, max_context=16, num_layers=2):
    return KVCache(num_layers=num_layers, num_kv_heads=2, head_dim=3, num_blocks=num_blocks, block_size=block_size,
                   max_context=max_context, dtype=torch.float32, device="cpu")


def test_block_zero_is_never_allocated():
    allocator = BlockAllocator(5)
    assert sorted(allocator.allocate(4)) == [1, 2, 3, 4]
    with pytest.raises(OutOfBlocks):
        allocator.allocate(1)


def test_failed_allocation_takes_nothing_and_free_returns_blocks():
    allocator = BlockAllocator(4)
    blocks = allocator.allocate(2)
    with pytest.raises(OutOfBlocks, match="need 2 KV blocks, 1 free"):
        allocator.allocate(2)
    assert allocator.num_free == 1
    allocator.free(blocks)
    assert allocator.num_free == 3


def test_pool_shapes_and_max_blocks_per_seq():
    cache = make_cache(num_blocks=8, block_size=4, max_context=13)
    assert cache.max_blocks_per_seq == 4  # ceil(13 / 4)
    assert len(cache.key_caches) == len(cache.value_caches) == 2
    assert cache.key_caches[0].shape == (8, 4, 2, 3)


def test_block_table_grows_only_as_needed():
    cache = make_cache(block_size=4)
    cache.reserve("a", 4)
    assert len(cache.block_tables["a"]) == 1
    cache.reserve("a", 5)
    cache.reserve("a", 5)
    assert len(cache.block_tables["a"]) == 2


def test_slot_of_position_follows_the_block_table():
    cache = make_cache(block_size=4)
    cache.reserve("x", 3)  # interleave two requests so that their blocks are not contiguous
    cache.reserve("a", 10)
    cache.reserve("x", 9)
    table = cache.block_tables["a"]
    assert cache.slots("a", 0, 10) == [table[p // 4] * 4 + p % 4 for p in range(10)]
    assert not set(cache.slots("a", 0, 10)) & set(cache.slots("x", 0, 9))
    assert 0 not in cache.slots("a", 0, 10) + cache.slots("x", 0, 9)  # slot 0 is the dummy slot


def test_reserve_beyond_max_context_raises():
    cache = make_cache(block_size=4, max_context=16)
    with pytest.raises(ValueError, match="'a': 17 tokens exceed max_context 16"):
        cache.reserve("a", 17)


def test_free_gives_blocks_back():
    cache = make_cache(num_blocks=4, block_size=4)
    cache.reserve("a", 12)
    with pytest.raises(OutOfBlocks):
        cache.reserve("b", 1)
    cache.free("a")
    assert "a" not in cache.block_tables
    cache.reserve("b", 12)


def test_block_table_tensor_is_int32_padded_with_the_reserved_block():
    cache = make_cache(block_size=4, max_context=16)
    cache.reserve("a", 5)
    cache.reserve("b", 1)
    tables = cache.block_table_tensor(["b", "a"], "cpu")
    assert tables.dtype == torch.int32 and tables.shape == (2, 4)
    assert tables.tolist() == [cache.block_tables["b"] + [0, 0, 0], cache.block_tables["a"] + [0, 0]]


def test_write_stores_kv_at_their_slots():
    cache = make_cache(block_size=4)
    cache.reserve("a", 6)
    k, v = torch.randn(2, 2, 3), torch.randn(2, 2, 3)
    cache.write(1, torch.tensor(cache.slots("a", 4, 6)), k, v)
    block = cache.block_tables["a"][1]
    assert torch.equal(cache.key_caches[1][block, :2], k)
    assert torch.equal(cache.value_caches[1][block, :2], v)
    assert not cache.key_caches[0].any()  # other layers untouched


def test_allocate_gives_zeroed_pools_at_new_addresses_and_keeps_the_block_tables():
    kv = KVCache(num_layers=2, num_kv_heads=2, head_dim=4, num_blocks=4, block_size=2, max_context=6,
                 dtype=torch.float32, device="cpu")
    kv.reserve("a", 3)
    kv.key_caches[0].fill_(1.0)
    old, old_caches = kv.data_ptrs(), kv.key_caches + kv.value_caches
    kv.allocate()
    assert len(set(old) & set(kv.data_ptrs())) == 0 and len(kv.data_ptrs()) == 4
    assert [c.abs().sum().item() for c in kv.key_caches + kv.value_caches] == [0.0] * 4
    assert [c.shape for c in kv.key_caches] == [c.shape for c in old_caches[:2]]
    assert kv.block_tables == {"a": [1, 2]}
