"""Models rayrl did not build: any HF causal-LM directory, hub id or GGUF file (converted once).

A model is given by path or hub id (`rayrl train CONFIG --model DIR|ORG/NAME --family
base|instruct`) or listed under `ladder.models` with `path` and `family`. A hub id resolves to
its snapshot in the Hugging Face cache, downloaded there first when the hub is reachable; with
HF_HUB_OFFLINE=1 only a cached id works (hub_dir). `check_model_dir` holds every check that
must pass before any actor starts; the CLI, the study and each Run call it. Its errors name
the file, the key and what was expected.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from rayrl.config import Config, ConfigError, ModelSpec
from rayrl.models.convert import converted, is_gguf

WEIGHT_GLOBS = ("*.safetensors", "*.bin")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # org/name, as the hub spells repo ids
# What a run needs from a hub repo: config, tokenizer, chat template, weights (safetensors,
# else .bin: HUB_FALLBACK), not the ONNX, GGUF or original checkpoints some repos also hold.
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
HUB_FALLBACK = ["*.bin"]


def is_hub_id(path: str) -> bool:
    """`path` reads as a hub repo id (org/name) and names nothing on this machine."""
    return bool(HUB_ID.fullmatch(path)) and not Path(path).expanduser().exists()


def hub_dir(repo_id: str, key: str = "--model") -> Path:
    """The local snapshot of hub model `repo_id`, as transformers and vLLM would use it: from
    the Hugging Face cache (HF_HUB_CACHE), downloaded into it first unless HF_HUB_OFFLINE."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=offline))
        if not any(next(path.glob(g), None) for g in WEIGHT_GLOBS) and not offline:
            path = Path(snapshot_download(repo_id, allow_patterns=HUB_FILES + HUB_FALLBACK))
        return path
    except LocalEntryNotFoundError:
        cache = Path(constants.HF_HUB_CACHE)
        folder = cache / f"models--{repo_id.replace('/', '--')}"
        why = (
            "HF_HUB_OFFLINE=1 forbids downloading it"
            if offline
            else "the hub could not be reached to download it"
        )
        raise ConfigError(
            f"key '{key}': {repo_id!r} is neither a model directory here nor a hub model in the "
            f"Hugging Face cache {cache} (HF_HUB_CACHE), and {why}. Download it where the hub "
            f"is reachable with `hf download {repo_id}` into the same cache (or copy that "
            f"cache's {folder.name}/ folder here), or put the model's files in "
            f"{folder}/snapshots/<revision>/ and write <revision> into {folder}/refs/main, or "
            f"pass the model's directory"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise ConfigError(
            f"key '{key}': {repo_id!r} is neither a model directory here nor a hub model that "
            f"could be downloaded: {type(e).__name__}: {e}"
        ) from None


def model_dir(path: str, key: str = "--model") -> Path:
    """The HF directory of a model path: the directory itself, a GGUF file's conversion, or
    a hub id's snapshot in the Hugging Face cache."""
    if is_gguf(path):
        return converted(path)
    return hub_dir(path, key) if is_hub_id(path) else Path(path).expanduser()


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
    try:
        directory = model_dir(path, key)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    config = directory / "config.json"
    if not (config.is_file() and any(next(directory.glob(g), None) for g in WEIGHT_GLOBS)):
        raise ConfigError(
            f"{where}: key '{key}' expected an HF model directory (config.json and "
            f"{' or '.join(WEIGHT_GLOBS)} weights), a hub id or a .gguf file, got {path!r}"
            + (f" (its snapshot {directory} lacks them)" if is_hub_id(path) else "")
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
