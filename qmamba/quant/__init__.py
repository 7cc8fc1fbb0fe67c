from .config import QuantConfig

__all__ = ["QuantConfig"]
