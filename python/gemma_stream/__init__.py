"""gemma_stream: stream checkpoints straight into preallocated parameters.

>>> import gemma_stream as gs
>>> with gs.init_empty():       # parameters on meta, buffers computed for real
...     model = MyModel()
>>> gs.load_into(model, "model.safetensors")
"""

import logging

from . import distributed, hf, maps  # hf imports transformers only when called; distributed torch.distributed
from .api import LoadReport, StateDict, TensorInfo, inspect, load_into, load_state_dict
from . import conversion
from .conversion import convert
from .errors import CheckpointError, GemmaStreamError, InternalError, MismatchError, UninitializedWarning, UsageError
from .executors import BACKEND, native_available
from .modules import init_empty
from .plan import PartialRoutes, Route
from .quant import QuantEmbedding, QuantLinear, quantize_
from .stream import TensorStream, iter_tensors

from ._version import __version__
from .deprecation import alias_module

# ``gs.convert`` is the function; its module is ``gemma_stream.conversion`` (the old module path
# ``gemma_stream.convert`` keeps working for imports, with a DeprecationWarning)
alias_module(__name__ + ".convert", conversion)
del alias_module

# silent unless the application configures logging (the CLI's -v does)
logging.getLogger("gemma_stream").addHandler(logging.NullHandler())

__all__ = [
    "BACKEND", "CheckpointError", "GemmaStreamError", "InternalError", "LoadReport", "MismatchError", "PartialRoutes",
    "QuantEmbedding", "QuantLinear", "Route", "StateDict", "TensorInfo", "TensorStream", "UninitializedWarning", "UsageError",
    "__version__", "convert", "distributed", "hf", "init_empty", "inspect", "iter_tensors", "maps", "load_into", "load_state_dict",
    "native_available", "quantize_",
]
