"""Pallas GPU kernels for NF4 weights (bitsandbytes layout), each beside a pure-jnp reference.

- ``pallas_kernels.nf4_dequantize``: NF4 -> bfloat16/float16/float32 (Triton; Mosaic GPU
  via ``implementation="mosaic_gpu"``, the ``jqlora.ops`` backend ``"mosaic_gpu"``).
- ``pallas_kernels.nf4_matmul``: fused ``x @ W.T`` and ``dy @ W`` (GEMV for M <= 3, tensor
  cores up to M = 64, dequantize + XLA dot above).

The kernels layer: these modules import only ``jqlora.format`` (checked by the
import-linter contract in ``pyproject.toml``); the backend choice lives in ``jqlora.ops``.
"""
