"""Compiled kernels beside ``pallas_kernels/`` (the GPU kernels): ``jqlora.kernels.native``, the
CPU NF4 dequantize in C called through XLA's FFI. Kernels see raw arrays and import only the format."""
