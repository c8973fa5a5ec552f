"""ultramem: sparse memory-layer language models (UltraMemV2, UltraMem v1, Memory+)."""

from . import ops
from .config import ConfigError, MemoryConfig, ModelConfig

__version__ = "0.1.0"

__all__ = ["ConfigError", "MemoryConfig", "ModelConfig", "ops"]
