"""The storage formats, at the bottom of the stack: nothing here imports the rest of jqlora.

- ``jqlora.format.nf4``: ``NF4Tensor`` (bitsandbytes' 4-bit storage as a pytree: NF4,
  FP4, or the Int4 baseline), ``quantize_4bit`` / ``quantize_nf4`` and
  ``dequantize_reference``, the pure-jnp decode that every kernel and backend is
  checked against;
- ``jqlora.format.torch_numerics``: torch's and bitsandbytes' float32 arithmetic,
  which the byte-exact double quantization needs.
"""

from jqlora.format.nf4 import (
                               CODES,
                               DYNAMIC_MAP_SIGNED,
                               FP4_CODE,
                               INT4_CODE,
                               NESTED_BLOCK_SIZE,
                               NF4_CODE,
                               NF4Tensor,
                               dequantize_absmax,
                               dequantize_reference,
                               quantize_4bit,
                               quantize_nf4,
                               storage_shapes,
)

__all__ = ["CODES", "DYNAMIC_MAP_SIGNED", "FP4_CODE", "INT4_CODE", "NESTED_BLOCK_SIZE", "NF4_CODE",
           "NF4Tensor", "dequantize_absmax", "dequantize_reference", "quantize_4bit", "quantize_nf4",
           "storage_shapes"]
