"""NF4 -> bfloat16/float16/float32 dequantize kernels (Triton and Mosaic GPU) and their reference."""

from pallas_kernels.nf4_dequantize.api import dequantize
from pallas_kernels.nf4_dequantize.reference import dequantize_reference

__all__ = ["dequantize", "dequantize_reference"]
