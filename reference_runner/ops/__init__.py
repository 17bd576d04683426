"""Device ops the model calls; importing this registers `torch.ops.npugraph.*`."""
from reference_runner.ops.attention import paged_attention, paged_decode_attention, prefill_attention

__all__ = ["paged_attention", "paged_decode_attention", "prefill_attention"]
