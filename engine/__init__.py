"""loopserve engine: the looped model with memory and everything that runs it."""

from engine.config import ModelConfig
from engine.engine_config import EngineConfig
from engine.errors import (
                           CheckpointError,
                           ConfigError,
                           EngineDeadError,
                           InvalidRequestError,
                           LoopServeError,
                           QueueFullError,
)
from engine.llm import LLM
from engine.llm_engine import LLMEngine, StepStats
from engine.model import ForwardOutput, LoopLM
from engine.presets import PRESETS, get_preset
from engine.request import CompletionOutput, RequestOutput, TokenLogprob
from engine.sampling_params import SamplingParams
from engine.tokenizer import ByteTokenizer, load_tokenizer
from engine.weights import load_model, save_model

__all__ = [
    "LLM", "PRESETS", "ByteTokenizer", "CheckpointError", "CompletionOutput", "ConfigError",
    "EngineConfig", "EngineDeadError", "ForwardOutput", "InvalidRequestError", "LLMEngine",
    "LoopLM", "LoopServeError", "ModelConfig", "QueueFullError", "RequestOutput",
    "SamplingParams", "StepStats", "TokenLogprob", "get_preset", "load_model",
    "load_tokenizer", "save_model",
]
