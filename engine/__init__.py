"""loopserve engine: everything that serves the looped model (re-exports `model`'s public names)."""

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
from engine.request import CompletionOutput, RequestOutput, TokenLogprob
from engine.sampling_params import OutputKind, SamplingParams
from model.config import ModelConfig
from model.looplm import ForwardOutput, LoopLM
from model.presets import PRESETS, get_preset
from model.tokenizer import ByteTokenizer, load_tokenizer
from model.weights import load_model, save_model

__all__ = [
    "LLM", "PRESETS", "ByteTokenizer", "CheckpointError", "CompletionOutput", "ConfigError",
    "EngineConfig", "EngineDeadError", "ForwardOutput", "InvalidRequestError", "LLMEngine",
    "LoopLM", "LoopServeError", "ModelConfig", "OutputKind", "QueueFullError", "RequestOutput",
    "SamplingParams", "StepStats", "TokenLogprob", "get_preset", "load_model",
    "load_tokenizer", "save_model",
]
