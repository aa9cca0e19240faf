"""Fused NF4 matmul kernels (``x @ W.T`` and ``dy @ W``) and their references."""

from pallas_kernels.nf4_matmul.api import check_operands, matmul, matmul_transposed
from pallas_kernels.nf4_matmul.reference import matmul_reference, matmul_transposed_reference

__all__ = ["check_operands", "matmul", "matmul_transposed", "matmul_reference",
           "matmul_transposed_reference"]
