"""The storage formats, at the bottom of the stack: nothing here imports the rest of jqlora.

- ``jqlora.format.nf4``: ``NF4Tensor`` (bitsandbytes' NF4 storage as a pytree),
  ``quantize_nf4`` and ``dequantize_reference``, the pure-jnp decode that every
  kernel and backend is checked against;
- ``jqlora.format.torch_numerics``: torch's and bitsandbytes' float32 arithmetic,
  which the byte-exact double quantization needs.
"""

from jqlora.format.nf4 import (
                               DYNAMIC_MAP_SIGNED,
                               NESTED_BLOCK_SIZE,
                               NF4_CODE,
                               NF4Tensor,
                               dequantize_absmax,
                               dequantize_reference,
                               quantize_nf4,
                               storage_shapes,
)

__all__ = ["DYNAMIC_MAP_SIGNED", "NESTED_BLOCK_SIZE", "NF4_CODE", "NF4Tensor", "dequantize_absmax",
           "dequantize_reference", "quantize_nf4", "storage_shapes"]
