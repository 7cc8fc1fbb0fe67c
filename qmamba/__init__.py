"""qmamba: post-training quantization of Mamba and Mamba2 (Q-Mamba: DSQ + ESR)."""
__version__ = "0.1.0"
