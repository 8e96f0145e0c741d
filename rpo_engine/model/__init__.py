from rpo_engine.model.checkpoint import load_model, load_tokenizer, save_pretrained
from rpo_engine.model.config import ModelConfig
from rpo_engine.model.decoder import CausalLM, PaddedAttention

__all__ = ["CausalLM", "ModelConfig", "PaddedAttention", "load_model", "load_tokenizer", "save_pretrained"]
