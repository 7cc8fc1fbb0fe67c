"""qmamba: post-training quantization of Mamba and Mamba2 (Q-Mamba: DSQ + ESR)."""
from ._version import __version__
from .api import load
from .quantize import quantize      # the function (shadows the submodule of the same name)

__all__ = ["__version__", "load", "quantize"]
