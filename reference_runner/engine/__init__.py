"""The engine under test: its options (`args`), continuous batching (`engine`, `scheduler`), one forward
(`model_runner`, `forward_batch`) and the paged KV cache (`kv_cache`)."""
