"""Models rayrl did not build: any HF causal-LM directory (or a GGUF file, converted once).

A model is given by path (`rayrl train CONFIG --model DIR --family base|instruct`) or listed
under `ladder.models` with `path` and `family`. `check_model_dir` holds every check that
must pass before any actor starts; the CLI, the study and each Run call it. Its errors name
the file, the key and what was expected.
"""

from __future__ import annotations

import json
from pathlib import Path

from rayrl.config import Config, ConfigError, ModelSpec
from rayrl.models.convert import converted, is_gguf

WEIGHT_GLOBS = ("*.safetensors", "*.bin")


def model_dir(path: str) -> Path:
    """The HF directory of a model path: the directory itself, or a GGUF file's conversion."""
    return converted(path) if is_gguf(path) else Path(path).expanduser()


def add_model(cfg: Config, path: str, family: str) -> str:
    """List the model at `path` under cfg.ladder.models (once) and return its name: the
    directory's (or GGUF file's) name, so run ids stay readable."""
    for spec in cfg.ladder.models:
        if spec.path == path and spec.family == family:
            return spec.name
    name = Path(path).expanduser().resolve().name.removesuffix(".gguf")
    if any(s.name == name and s.family == family for s in cfg.ladder.models):
        raise ConfigError(
            f"{cfg.source or '<config>'}: key '--model' expected a path whose name is not "
            f"already a ladder.models entry of family {family!r}, got {path!r} (name {name!r})"
        )
    cfg.ladder.models.append(ModelSpec(name=name, path=path, family=family))
    return name


def check_model_dir(cfg: Config, path: str, key: str) -> Path:
    """Check that the model at `path` (given in cfg.source under `key`) can run this config
    before any actor starts; returns its HF directory.

    The directory must hold config.json and weights; vLLM must serve its architecture; its
    context must hold grpo.max_prompt_tokens + grpo.max_new_tokens; on CPU, vLLM's attention
    must support its head size.
    """
    where = cfg.source or "<config>"
    directory = model_dir(path)
    config = directory / "config.json"
    if not (config.is_file() and any(next(directory.glob(g), None) for g in WEIGHT_GLOBS)):
        raise ConfigError(
            f"{where}: key '{key}' expected an HF model directory (config.json and "
            f"{' or '.join(WEIGHT_GLOBS)} weights) or a .gguf file, got {path!r}"
        )
    try:
        hf = json.loads(config.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: key '{key}': {config} is not valid JSON ({e})") from None
    archs = hf.get("architectures") or []
    supported = vllm_architectures()
    if not any(a in supported for a in archs):
        raise ConfigError(
            f"{config}: key 'architectures' expected an architecture that vLLM can serve "
            f"(e.g. LlamaForCausalLM, Qwen2ForCausalLM; vLLM's ModelRegistry lists "
            f"{len(supported)}), got {archs} (model {path!r}, {where} key '{key}')"
        )
    g = cfg.grpo
    need = g.max_prompt_tokens + g.max_new_tokens
    context = _text_config(hf).get("max_position_embeddings")
    if context is not None and need > context:
        raise ConfigError(
            f"{where}: keys 'grpo.max_prompt_tokens' + 'grpo.max_new_tokens' = "
            f"{g.max_prompt_tokens} + {g.max_new_tokens} = {need} expected at most the model's "
            f"context, max_position_embeddings = {context} in {config}"
        )
    if cfg.resources.device == "cpu":
        from rayrl.rollout.worker import check_cpu_head_size

        check_cpu_head_size(str(directory))
    return directory


def check_models(cfg: Config, models: list[tuple[str, str]]) -> None:
    """check_model_dir for each (name, family) of `models` that is given by path."""
    for name, family in models:
        spec = cfg.model(name, family)
        if spec.path:
            i = cfg.ladder.models.index(spec)
            check_model_dir(cfg, spec.path, f"ladder.models[{i}].path")


def vllm_architectures() -> set[str]:
    """Architectures (config.json `architectures` names) that the installed vLLM serves."""
    from vllm.model_executor.models import ModelRegistry

    return set(ModelRegistry.get_supported_archs())


def _text_config(hf: dict) -> dict:
    """A multimodal config keeps its language model's settings under text_config."""
    return hf.get("text_config") or hf
