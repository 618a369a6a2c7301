"""camelid: the whole life of a LLaMA-family model in one small package."""

from camelid.checkpoint import from_pretrained, save_pretrained
from camelid.config import PRESETS, ModelConfig
from camelid.engine import LLM, SamplingParams
from camelid.generate import generate, generate_ids, stream
from camelid.model import KVCache, Transformer
from camelid.tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = ["LLM", "PRESETS", "KVCache", "ModelConfig", "SamplingParams", "Tokenizer", "Transformer", "from_pretrained",
           "generate", "generate_ids", "save_pretrained", "stream"]
