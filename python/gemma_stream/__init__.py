"""gemma_stream: stream checkpoints straight into preallocated parameters.

>>> import gemma_stream as gs
>>> with torch.device("meta"):
...     model = MyModel()
>>> gs.load_into(model, "model.safetensors")
"""

import logging

from . import hf, maps  # hf imports transformers only when called
from .api import LoadReport, TensorInfo, inspect, load_into, load_state_dict
from .convert import convert
from .errors import CheckpointError, GemmaStreamError, MismatchError
from .executors import BACKEND, native_available
from .plan import Route
from .quant import QuantEmbedding, QuantLinear, quantize_
from .stream import iter_tensors

__version__ = "0.1.0"

# silent unless the application configures logging (the CLI's -v does)
logging.getLogger("gemma_stream").addHandler(logging.NullHandler())

__all__ = [
    "BACKEND", "CheckpointError", "GemmaStreamError", "LoadReport", "MismatchError", "QuantEmbedding", "QuantLinear",
    "Route", "TensorInfo",
    "__version__", "convert", "hf", "inspect", "iter_tensors", "maps", "load_into", "load_state_dict",
    "native_available", "quantize_",
]
