from rpo_engine.model.checkpoint import from_transformers, load_model, load_tokenizer, save_pretrained
from rpo_engine.model.config import ModelConfig
from rpo_engine.model.decoder import CausalLM, PaddedAttention
from rpo_engine.model.lora import adapters_disabled, apply_lora, load_adapter, save_adapter

__all__ = ["CausalLM", "ModelConfig", "PaddedAttention", "adapters_disabled", "apply_lora", "from_transformers",
           "load_adapter", "load_model", "load_tokenizer", "save_adapter", "save_pretrained"]
