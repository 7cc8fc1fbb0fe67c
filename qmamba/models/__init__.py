from .cache import InferenceCache, LayerState, SSMState
from .config import ModelConfig
from .lm import MambaLM, init_weights

__all__ = ["InferenceCache", "LayerState", "SSMState", "ModelConfig", "MambaLM", "init_weights"]
