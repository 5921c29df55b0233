"""mend: MEND (Model Editor Networks with Gradient Decomposition) for today's transformers."""

from .allocator import keep_freed_memory
from .batching import EditInputError
from .checkpoint import CheckpointError
from .config import ConfigError, load_config
from .editor import EditFailedError, EditResult, Editor
from .models import ModelNotFoundError, load_base_model

__version__ = "0.1.0"

__all__ = [
    "Editor",
    "EditResult",
    "load_base_model",
    "load_config",
    "EditInputError",
    "EditFailedError",
    "CheckpointError",
    "ConfigError",
    "ModelNotFoundError",
    "keep_freed_memory",
    "__version__",
]
