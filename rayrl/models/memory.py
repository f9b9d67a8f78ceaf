"""GPU memory per actor, estimated from a model's architecture and a config's resources.

`rayrl study CONFIG --dry-run` (rayrl/study/dryrun.py) checks these estimates against
resources.gpu_memory_gib before any GPU is spent. They are estimates, not measurements:
sums of tensor sizes for what each actor holds at its peak, plus fixed allowances for what
does not follow from the shapes (CUDA context, allocator slack, CUDA graphs). Every term is
named so that a run's measured peak can be set beside it.

Learner rank (one GPU, bf16 as learner/actor.py builds it at resources.learner_dtype auto),
P parameters, N ranks: weights 2P, gradients 2P, Adam 12P (fp32 master copy + two moments;
8P and 4-byte weights, gradients and activations at learner_dtype float32), sharded over N
ranks from ZeRO stage 3, 2 and 1 respectively (Rajbhandari et al. 2020, "ZeRO", section 5);
  one rank runs stage 0 (ResourcesConfig.learner_zero_stage): no ZeRO buffers;
  the reference model 2P, sharded like the weights, and none at grpo.kl_coef 0 (the learner
  builds none);
  DeepSpeed's buffers at its defaults; activations of one micro-batch of
  grpo.micro_batch x (max_prompt_tokens + max_new_tokens) tokens (or grpo.micro_batch_tokens,
  at least one whole sample); the fp32 log-softmax
  over the vocabulary for those tokens (learner/grpo.py token_logprobs).
vLLM engine (tensor_parallel GPUs): weights / tensor_parallel, the KV cache
  (resources.vllm_kv_cache_gib, which vLLM gets as kv_cache_memory_bytes per GPU), and an
  allowance for CUDA graphs, the sampler and one batch's activations.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from rayrl.config import Config, ConfigError, GRPOConfig, ResourcesConfig

GIB = float(1 << 30)

# Fixed allowances per GPU (GiB), not derived from shapes: CUDA context, cuBLAS and NCCL
# workspaces, allocator fragmentation; for vLLM also CUDA graphs, the sampler's logits and
# the activations of one scheduled batch.
LEARNER_RUNTIME_GIB = 3.0
VLLM_RUNTIME_GIB = 4.0

# DeepSpeed's defaults, which learner/actor.py leaves alone: gradient reduce and all-gather
# buckets of 5e8 elements (stages 1-2), at most 1e9 parameters gathered at once (stage 3).
DS_BUCKET = 500_000_000
DS_MAX_LIVE = 1_000_000_000

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4}


@dataclass(frozen=True)
class Architecture:
    """The shapes that memory depends on, as in a Llama/Qwen2 config.json."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tie_embeddings: bool
    qkv_bias: bool
    head_dim: int = 0  # 0: hidden // heads

    @property
    def dim(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def layer_params(self) -> int:
        h, q, kv = self.hidden, self.heads * self.dim, self.kv_heads * self.dim
        attention = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.qkv_bias else 0)
        return attention + 3 * h * self.intermediate + 2 * h  # + SwiGLU MLP + two RMSNorms

    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    def params(self) -> int:
        heads = 1 if self.tie_embeddings else 2
        return heads * self.embedding_params() + self.layers * self.layer_params() + self.hidden

    def activation_bytes_per_token(self) -> int:
        """Bytes one decoder layer keeps for backward per token, in bf16 without activation
        checkpointing (HF's Llama/Qwen2 layer with SDPA attention):
        each RMSNorm 8h (its fp32 input, normalized and scaled bf16 copies), attention 6q + 4kv
        (rotated q, k and v, the attention output and its contiguous copy for o_proj),
        SwiGLU MLP 8i (gate, up, silu(gate), their product)."""
        q, kv = self.heads * self.dim, self.kv_heads * self.dim
        return 16 * self.hidden + 6 * q + 4 * kv + 8 * self.intermediate


# The paper's models (configs/qwen2.5-*.yaml, configs/llama3-instruct.yaml), from each model
# card's config.json on the Hugging Face hub (Qwen/Qwen2.5-*, meta-llama/Llama-3.*); an
# -Instruct model has its base model's architecture. A model directory with a config.json
# is read instead (`architecture`), so this table is only for planning away from the volume.
PAPER_MODELS: dict[str, Architecture] = {
    "Qwen2.5-0.5B": Architecture(896, 24, 14, 2, 4864, 151936, True, True),
    "Qwen2.5-1.5B": Architecture(1536, 28, 12, 2, 8960, 151936, True, True),
    "Qwen2.5-3B": Architecture(2048, 36, 16, 2, 11008, 151936, True, True),
    "Qwen2.5-7B": Architecture(3584, 28, 28, 4, 18944, 152064, False, True),
    "Qwen2.5-14B": Architecture(5120, 48, 40, 8, 13824, 152064, False, True),
    "Qwen2.5-32B": Architecture(5120, 64, 40, 8, 27648, 152064, False, True),
    "Qwen2.5-72B": Architecture(8192, 80, 64, 8, 29568, 152064, False, True),
    "Llama-3.2-1B": Architecture(2048, 16, 32, 8, 8192, 128256, True, False, head_dim=64),
    "Llama-3.2-3B": Architecture(3072, 28, 24, 8, 8192, 128256, True, False, head_dim=128),
    "Llama-3.1-8B": Architecture(4096, 32, 32, 8, 14336, 128256, False, False),
    "Llama-3.1-70B": Architecture(8192, 80, 64, 8, 28672, 128256, False, False),
}


def from_hf_config(hf: dict) -> Architecture:
    """The architecture in an HF config.json (a multimodal one keeps it under text_config)."""
    c = hf.get("text_config") or hf
    return Architecture(
        hidden=c["hidden_size"],
        layers=c["num_hidden_layers"],
        heads=c["num_attention_heads"],
        kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
        intermediate=c["intermediate_size"],
        vocab=c["vocab_size"],
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        qkv_bias=c.get("model_type") == "qwen2" or bool(c.get("attention_bias", False)),
        head_dim=c.get("head_dim") or 0,
    )


def architecture(cfg: Config, model: str, family: str | None = None) -> Architecture:
    """A study model's architecture: its config.json when the directory is here, else the
    paper's table by directory name; a ladder model's from its spec."""
    spec = cfg.model(model, family)
    if not spec.path:
        from rayrl.models.tokenizer import build_tokenizer

        return Architecture(
            hidden=spec.hidden,
            layers=spec.layers,
            heads=spec.heads,
            kv_heads=spec.kv_heads,
            intermediate=spec.mlp_width,
            vocab=len(build_tokenizer()),
            tie_embeddings=spec.tie_embeddings,
            qkv_bias=True,  # rayrl's ladder is Qwen2
        )
    config = Path(spec.path).expanduser() / "config.json"
    if config.is_file():
        return from_hf_config(json.loads(config.read_text()))
    name = Path(spec.path).name.removesuffix("-Instruct")
    if name in PAPER_MODELS:
        return PAPER_MODELS[name]
    raise ConfigError(
        f"{cfg.source or '<config>'}: model {model!r} path {spec.path!r}: no config.json here "
        f"to size it from, and not one of the known models ({', '.join(PAPER_MODELS)})"
    )


def learner_gib(
    arch: Architecture, r: ResourcesConfig, g: GRPOConfig, checkpointing: bool
) -> dict[str, float]:
    """Estimated GiB on one learner rank's GPU, by part. `checkpointing`: whether decoder
    layers recompute their activations in backward (then each keeps only its input)."""
    p, n, z = arch.params(), r.learners, r.learner_zero_stage  # one rank: stage 0
    b = DTYPE_BYTES["bfloat16" if r.learner_bf16 else "float32"]
    longest = g.max_prompt_tokens + g.max_new_tokens
    # One micro-batch: micro_batch samples, or the token budget (a longer sample goes alone).
    tokens = max(g.micro_batch_tokens, longest) if g.micro_batch_tokens else g.micro_batch * longest
    per_layer = arch.activation_bytes_per_token() * b // 2  # counted in bf16
    if checkpointing:
        activations = tokens * (arch.layers * b * arch.hidden + per_layer)
    else:
        activations = tokens * arch.layers * per_layer
    if z == 3:
        largest = max(arch.embedding_params(), arch.layer_params())
        buffers = b * (max(min(p, DS_MAX_LIVE), largest) + min(p, DS_BUCKET))
    elif z > 0:
        buffers = b * 2 * min(p, DS_BUCKET)
    else:
        buffers = 0
    parts = {
        "weights": b * p / (n if z >= 3 else 1),
        "gradients": b * p / (n if z >= 2 else 1),
        "adam": (12 if b == 2 else 8) * p / (n if z >= 1 else 1),  # + fp32 master in bf16
        "zero_buffers": buffers,
        "activations": activations,
        # logits in bf16 -> fp32 copies in token_logprobs, and their gradient in backward
        "logits": tokens * arch.vocab * 12,
    }
    if g.kl_coef != 0:
        parts["reference"] = b * p / (n if z >= 3 else 1)
    return {k: v / GIB for k, v in parts.items()} | {"runtime": LEARNER_RUNTIME_GIB}


def kv_bytes_per_token(arch: Architecture, r: ResourcesConfig) -> int:
    """KV cache bytes per token on one GPU of a tensor-parallel engine (vLLM replicates KV
    heads when tensor_parallel exceeds them)."""
    heads = math.ceil(arch.kv_heads / r.tensor_parallel)
    return 2 * arch.layers * heads * arch.dim * dtype_bytes(r.vllm_dtype)


def rollout_gib(arch: Architecture, r: ResourcesConfig) -> dict[str, float]:
    """Estimated GiB on each GPU of one vLLM engine, by part."""
    return {
        "weights": dtype_bytes(r.vllm_dtype) * arch.params() / r.tensor_parallel / GIB,
        "kv_cache": r.vllm_kv_cache_gib,
        "runtime": VLLM_RUNTIME_GIB,
    }


def dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise ConfigError(
            f"resources.vllm_dtype: expected one of {list(DTYPE_BYTES)}, got {dtype!r}"
        )
    return DTYPE_BYTES[dtype]
