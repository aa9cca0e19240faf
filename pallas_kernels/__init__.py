"""Pallas GPU kernels for NF4 weights (bitsandbytes layout), each beside a pure-jnp reference.

- ``pallas_kernels.nf4_dequantize``: NF4 -> bfloat16/float16/float32 (Triton; Mosaic GPU
  via ``implementation="mosaic_gpu"``, the ``jqlora.ops`` backend ``"mosaic_gpu"``).
- ``pallas_kernels.nf4_matmul``: fused ``x @ W.T`` and ``dy @ W`` (GEMV for M <= 3, tensor
  cores up to M = 64, dequantize + XLA dot above), split-K so that a launch fills an H200.
- ``pallas_kernels.sm90``: the Triton kernels compiled to sm_90a machine code without a GPU
  (pip ``triton``, the ``gpu-tools`` extra): registers, spills, shared memory.

Every kernel decodes 4-bit codes through a static 16-entry table (NF4 by default; FP4 and
Int4 reuse the same kernels) by a select tree on the code bits: no table in memory.

The kernels layer: these modules import only ``jqlora.format`` (checked by the
import-linter contract in ``pyproject.toml``); the backend choice lives in ``jqlora.ops``.
"""
