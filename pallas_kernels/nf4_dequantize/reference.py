"""Pure-jnp reference of the NF4 dequantize kernels: the format's own decode.

``dequantize_reference(t, dtype=None) -> dtype[t.shape]`` is
``jqlora.format.dequantize_reference``; the kernels must match it bit for bit.
"""

from jqlora.format import dequantize_reference

__all__ = ["dequantize_reference"]
