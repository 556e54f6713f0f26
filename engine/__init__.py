"""loopserve engine: the looped model with memory and everything that runs it."""

from engine.config import ModelConfig
from engine.errors import (
                           CheckpointError,
                           ConfigError,
                           EngineDeadError,
                           InvalidRequestError,
                           LoopServeError,
                           QueueFullError,
)
from engine.model import ForwardOutput, LoopLM
from engine.presets import PRESETS, get_preset
from engine.tokenizer import ByteTokenizer, load_tokenizer
from engine.weights import load_model, save_model

__all__ = [
    "ByteTokenizer", "CheckpointError", "ConfigError", "EngineDeadError", "ForwardOutput",
    "InvalidRequestError", "LoopLM", "LoopServeError", "ModelConfig", "PRESETS",
    "QueueFullError", "get_preset", "load_model", "load_tokenizer", "save_model",
]
