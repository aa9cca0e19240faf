"""Pallas GPU kernels for NF4 weights (bitsandbytes layout), each beside a pure-jnp reference.

- ``pallas_kernels.nf4_dequantize``: NF4 -> bfloat16/float16/float32 (Triton; Mosaic GPU
  via ``implementation="mosaic_gpu"`` or ``$JQLORA_DEQUANTIZE_KERNEL``).
- ``pallas_kernels.nf4_matmul``: fused ``x @ W.T`` and ``dy @ W`` (GEMV for M <= 3, tensor
  cores up to M = 64, dequantize + XLA dot above).
"""
