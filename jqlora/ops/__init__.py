"""NF4 operations behind one backend registry: ``dequantize_nf4`` and ``nf4_matmul``.

Each op lists its backends in order of preference and falls through to the next
on ``NotImplementedError`` (``jqlora.ops.registry``); ``backend=`` or
``$JQLORA_BACKEND`` names them. The ops sit above the format and the kernels
(``pallas_kernels``, ``jqlora.kernels``) and below the modules.
"""

from jqlora.ops.dequantize import DEQUANTIZE, dequantize_nf4
from jqlora.ops.matmul import NF4_MATMUL, nf4_matmul
from jqlora.ops.registry import ENV_VAR, Implementation, Op

__all__ = ["DEQUANTIZE", "ENV_VAR", "Implementation", "NF4_MATMUL", "Op", "dequantize_nf4",
           "nf4_matmul"]
