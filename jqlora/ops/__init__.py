"""Operations behind one backend registry: ``dequantize_nf4``, ``nf4_matmul`` and ``attention``.

Each op lists its backends in order of preference and falls through to the next
on ``NotImplementedError`` (``jqlora.ops.registry``); ``backend=`` or
``$JQLORA_BACKEND`` names them. The ops sit above the format and the kernels
(``pallas_kernels``, ``jqlora.kernels``) and below the modules.
"""

from jqlora.ops.attention import ATTENTION, attention, attention_blockwise, attention_reference
from jqlora.ops.dequantize import DEQUANTIZE, dequantize_nf4
from jqlora.ops.matmul import NF4_MATMUL, matmul_wt, nf4_matmul
from jqlora.ops.registry import ENV_VAR, Implementation, Op

__all__ = ["ATTENTION", "DEQUANTIZE", "ENV_VAR", "Implementation", "NF4_MATMUL", "Op", "attention",
           "attention_blockwise", "attention_reference", "dequantize_nf4", "matmul_wt",
           "nf4_matmul"]
