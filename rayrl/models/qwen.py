"""Qwen2-architecture models for the ladder, saved as ordinary HF model directories."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from transformers.utils import logging as hf_logging

from rayrl.config import ModelSpec


def qwen2_config(
    spec: ModelSpec, tokenizer: PreTrainedTokenizerFast, max_len: int = 512
) -> Qwen2Config:
    """Members of the ladder differ only in width and depth."""
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden,
        intermediate_size=spec.mlp_width,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=max_len,
        tie_word_embeddings=spec.tie_embeddings,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rope_theta=10000.0,
        dtype="float32",
    )


def init_model(
    spec: ModelSpec, tokenizer: PreTrainedTokenizerFast, seed: int = 0
) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(qwen2_config(spec, tokenizer))


def save_model_dir(
    model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast, path: str | Path
) -> Path:
    """config.json + model.safetensors + tokenizer.json, loadable offline by transformers and vLLM."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar per one-shard save is noise in the ladder's output
    try:
        model.save_pretrained(path, safe_serialization=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(path)
    return path
