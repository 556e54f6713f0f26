"""The looped transformer with memory (Frey et al., 2026): config, presets, layers, memory
banks, the block, `LoopLM` with its reference forward, weights, tokenizer and FLOP formulas.

Imports nothing of `engine`, `server`, `clients` or `training`.
"""

from model.config import ModelConfig
from model.errors import CheckpointError, ConfigError, InvalidRequestError, LoopServeError
from model.looplm import ForwardOutput, LoopLM
from model.presets import PRESETS, get_preset
from model.tokenizer import ByteTokenizer, load_tokenizer
from model.weights import load_model, save_model

__all__ = [
    "PRESETS", "ByteTokenizer", "CheckpointError", "ConfigError", "ForwardOutput",
    "InvalidRequestError", "LoopLM", "LoopServeError", "ModelConfig", "get_preset",
    "load_model", "load_tokenizer", "save_model",
]
