from .cache import InferenceCache, LayerState, SSMState
from .config import ModelConfig
from .lm import MambaLM, QuantState, init_weights

__all__ = ["InferenceCache", "LayerState", "SSMState", "ModelConfig", "MambaLM", "QuantState", "init_weights"]
