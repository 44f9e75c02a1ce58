"""gemma_stream: stream checkpoints straight into preallocated parameters.

>>> import gemma_stream as gs
>>> with torch.device("meta"):
...     model = MyModel()
>>> gs.load_into(model, "model.safetensors")
"""

import logging

from . import distributed, hf, maps  # hf imports transformers only when called; distributed torch.distributed
from .api import LoadReport, TensorInfo, inspect, load_into, load_state_dict
from .convert import convert
from .errors import CheckpointError, GemmaStreamError, MismatchError
from .executors import BACKEND, native_available
from .plan import PartialRoutes, Route
from .quant import QuantEmbedding, QuantLinear, quantize_

__version__ = "0.1.0"

# silent unless the application configures logging (the CLI's -v does)
logging.getLogger("gemma_stream").addHandler(logging.NullHandler())

__all__ = [
    "BACKEND", "CheckpointError", "GemmaStreamError", "LoadReport", "MismatchError", "PartialRoutes", "QuantEmbedding", "QuantLinear",
    "Route", "TensorInfo",
    "__version__", "convert", "distributed", "hf", "inspect", "maps", "load_into", "load_state_dict", "native_available", "quantize_",
]
