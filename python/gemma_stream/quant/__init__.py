"""Quantization: reference quantizers (the contract), quantized modules, and ``quantize_``.

- ``reference``: ``quantize_int8`` / ``quantize_int4`` / ``dequantize`` on plain tensors (no
  ``torch.nn``): the bit-for-bit contract of both executors (docs/FORMATS.md);
- ``modules``: :class:`QuantLinear`, :class:`QuantEmbedding`, :class:`QuantScaledEmbedding`,
  whose ``state_dict()`` is always the contract layout;
- ``swap``: ``quantize_``, which decides which layers become those and says why others stay float;
- ``int4_cpu``: torch's CPU int4 kernel layout, converted in place.

>>> with gs.init_empty():
...     model = MyModel()
>>> gs.load_into(model, "model.safetensors", quantize="int4", group_size=128)
"""

from .modules import QuantEmbedding, QuantLinear, QuantScaledEmbedding
from .reference import FLT_EPSILON, GROUP_SIZES, dequantize, quantize_int4, quantize_int8
from .swap import QuantizeReport, quantize_

__all__ = ["quantize_int8", "quantize_int4", "dequantize", "quantize_", "QuantLinear", "QuantEmbedding",
           "QuantScaledEmbedding", "QuantizeReport", "FLT_EPSILON", "GROUP_SIZES"]
