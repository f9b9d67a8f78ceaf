"""The tiny model ladder: Qwen2 models that differ only in width and depth, pre-trained
on the synthetic arithmetic task, saved as HF model directories and cached.

A model's cache key hashes its architecture, the pre-training settings and the task
settings, so changing any of them builds a new model, and a second build is instant.
Models missing from the cache build in parallel worker processes (spawned, so a script
that calls `build_ladder` at import time needs the usual `if __name__ == "__main__":`).
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import os
import queue
import random
from concurrent.futures import ProcessPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from rayrl.config import Config, ModelSpec
from rayrl.data.synthetic import completion_text, corpus_level, draw_pair, prompt_text
from rayrl.models.entry import ENTRY_FILE, LadderEntry
from rayrl.storage import write_bytes_atomic

__all__ = ["LadderEntry", "build_ladder", "format_table", "ladder_dir", "model_path"]

CACHE_VERSION = 3  # bump when pre-training or evaluation code changes what a build produces
MANIFEST = "ladder.json"
ARCHITECTURE = ("hidden", "layers", "heads", "kv_heads", "intermediate", "tie_embeddings")


def ladder_dir(cfg: Config) -> Path:
    """$RAYRL_CACHE/ladder when that is set, else ladder.dir from the config."""
    root = os.environ.get("RAYRL_CACHE")
    return Path(root).expanduser() / "ladder" if root else Path(cfg.ladder.dir).expanduser()


def cache_key(cfg: Config, spec: ModelSpec) -> str:
    lad, data = cfg.ladder, cfg.data
    settings = {
        "version": CACHE_VERSION,
        "architecture": [getattr(spec, f) for f in ARCHITECTURE],
        "instruct_steps": spec.instruct_steps,
        "pretrain": [
            lad.pretrain_tokens_per_param,
            lad.pretrain_min_steps,
            lad.pretrain_batch,
            lad.pretrain_lr,
            lad.pretrain_lr_width,
            lad.pretrain_hardest_share,
            lad.pretrain_unboxed_share,
            lad.seed,
        ],
        "eval": [lad.eval_problems, lad.eval_samples, cfg.grpo.eval_temperature],
        "task": [data.max_digits, data.test_size, data.seed],
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def pretrain_steps(cfg: Config, non_embedding: int) -> int:
    """Equal tokens per parameter, or equal steps when that is 0 (rayrl/DESIGN.md's measured hints:
    never equal wall time), with a floor of pretrain_min_steps."""
    lad = cfg.ladder
    tokens = lad.pretrain_tokens_per_param * non_embedding
    per_step = lad.pretrain_batch * mean_sequence_tokens(
        cfg.data.max_digits, lad.pretrain_hardest_share
    )
    return max(lad.pretrain_min_steps, math.ceil(tokens / per_step))


def mean_sequence_tokens(max_digits: int, hardest_share: float, n: int = 512) -> float:
    """Average corpus sequence length in tokens: prompt, completion and EOS."""
    from rayrl.models.tokenizer import build_tokenizer  # transformers: only when building

    rng = random.Random(0)
    problems = [draw_pair(rng, corpus_level(rng, max_digits, hardest_share)) for _ in range(n)]
    texts = [prompt_text(p) + completion_text(p) for p in problems]
    ids = build_tokenizer()(texts, add_special_tokens=False)["input_ids"]
    return sum(len(x) + 1 for x in ids) / n


def build_ladder(
    cfg: Config, names: list[str] | None = None, progress: bool = True
) -> list[LadderEntry]:
    """Build (or find in the cache) the ladder models named, all by default.

    Models given by `path` (existing checkpoints) are not built and not listed.
    """
    specs = [cfg.model(n) for n in names] if names is not None else list(cfg.ladder.models)
    return _entries(cfg, [s for s in specs if not s.path], progress)


def model_path(cfg: Config, name: str, family: str | None = None) -> Path:
    """The HF model directory of model `name`: its `path` when it has one (a GGUF file's
    conversion, made now if missing), else its ladder build (made now if missing)."""
    spec = cfg.model(name, family)
    if spec.path:
        from rayrl.models.external import model_dir

        return model_dir(spec.path)
    return Path(_entries(cfg, [spec], progress=False)[0].path)


def format_table(entries: list[LadderEntry]) -> str:
    """name, total and non-embedding parameters, held-out pass@1."""
    head = ("model", "total params", "non-embedding params", "held-out pass@1")
    rows = [
        (e.name, f"{e.total_params:,}", f"{e.non_embedding_params:,}", f"{e.pass_at_1:.3f}")
        for e in entries
    ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in [head, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _model_dir(root: Path, cfg: Config, spec: ModelSpec) -> Path:
    return root / f"{spec.name}-{cache_key(cfg, spec)}"


def _cached(root: Path, cfg: Config, spec: ModelSpec) -> LadderEntry | None:
    path = _model_dir(root, cfg, spec)
    entry = path / ENTRY_FILE
    if not (entry.is_file() and (path / "model.safetensors").is_file()):
        return None
    return LadderEntry(**{**json.loads(entry.read_text()), "path": str(path)})


def _entries(cfg: Config, specs: list[ModelSpec], progress: bool) -> list[LadderEntry]:
    root = ladder_dir(cfg)
    entries = [_cached(root, cfg, s) for s in specs]
    todo = [i for i, e in enumerate(entries) if e is None]
    if todo:
        root.mkdir(parents=True, exist_ok=True)
        for i, entry in zip(todo, _build_all(root, cfg, [specs[i] for i in todo], progress)):
            entries[i] = entry
    _write_manifest(root, entries)
    return entries


def _build_all(
    root: Path, cfg: Config, specs: list[ModelSpec], progress: bool
) -> list[LadderEntry]:
    from rayrl.models.build import build_model, non_embedding_params  # torch: only when building

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; workers inherit it
    sizes = [non_embedding_params(s) for s in specs]
    steps = [pretrain_steps(cfg, n) for n in sizes]
    dirs = [_model_dir(root, cfg, s) for s in specs]
    workers = min(len(specs), os.cpu_count() or 1)
    # The bar counts steps weighted by N, i.e. training FLOPs, so its time estimate holds.
    with tqdm(
        total=sum((n + sp.instruct_steps) * s for n, s, sp in zip(steps, sizes, specs)),
        desc=f"pre-training {', '.join(s.name for s in specs)}",
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}",
        disable=not progress,
        mininterval=1.0,
    ) as bar:
        if workers == 1:
            return [
                build_model(cfg, s, n, d, lambda k, w=w: bar.update(k * w))
                for s, n, d, w in zip(specs, steps, dirs, sizes)
            ]
        ctx = mp.get_context("spawn")  # fork after torch has started threads can hang
        done = ctx.Queue()
        with ProcessPoolExecutor(workers, ctx, _init_worker, (done,)) as pool:
            # Largest first, so that the longest build starts at once.
            order = sorted(range(len(specs)), key=lambda i: -steps[i] * sizes[i])
            futures = {
                i: pool.submit(_worker_build, cfg, specs[i], steps[i], dirs[i], sizes[i])
                for i in order
            }
            pending = set(futures.values())
            while pending:
                _, pending = wait(pending, timeout=0.5)
                _drain(done, bar)
            _drain(done, bar)
            return [futures[i].result() for i in range(len(specs))]


_progress: mp.Queue | None = None


def _init_worker(done: mp.Queue) -> None:
    global _progress
    _progress = done


def _worker_build(cfg: Config, spec: ModelSpec, steps: int, out: Path, weight: int) -> LadderEntry:
    from rayrl.models.build import build_model

    def report(k: int) -> None:
        if _progress is not None:
            _progress.put(k * weight)

    return build_model(cfg, spec, steps, out, report)


def _drain(done: mp.Queue, bar: tqdm) -> None:
    while True:
        try:
            bar.update(done.get_nowait())
        except queue.Empty:
            return


def _write_manifest(root: Path, entries: list[LadderEntry]) -> None:
    manifest = root / MANIFEST
    known = json.loads(manifest.read_text()) if manifest.is_file() else {}
    known.update({e.name: asdict(e) for e in entries})
    root.mkdir(parents=True, exist_ok=True)
    # Atomic: another process (a second study, a test worker) may read it mid-write.
    write_bytes_atomic(manifest, json.dumps(known, indent=1).encode())
