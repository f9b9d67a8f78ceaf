"""Build one ladder model: initialise, pre-train, measure held-out pass@1, save."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch

from rayrl.config import Config, ModelSpec
from rayrl.data.curriculum import curriculum_order
from rayrl.data.synthetic import held_out, to_rows
from rayrl.models.entry import ENTRY_FILE, LadderEntry
from rayrl.models.evaluate import pass_at_1
from rayrl.models.flops import count_params
from rayrl.models.pretrain import pretrain
from rayrl.models.qwen import init_model, save_model_dir
from rayrl.models.tokenizer import build_tokenizer


@contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models gain little from intra-op threads, and on a shared machine OpenMP
    threads that wait on each other run many times slower; builds run in parallel instead."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def non_embedding_params(spec: ModelSpec) -> int:
    return count_params(init_model(spec, build_tokenizer()))[1]


def pretrain_lr(cfg: Config, spec: ModelSpec) -> float:
    """Adam's learning rate falls as 1/width (muP): wide models diverge at a narrow one's rate."""
    return cfg.ladder.pretrain_lr * cfg.ladder.pretrain_lr_width / spec.hidden


def build_model(
    cfg: Config, spec: ModelSpec, steps: int, out: Path, on_steps: Callable[[int], None] | None
) -> LadderEntry:
    """Pre-train `spec` for `steps`, score it on the held-out set and save it at `out`."""
    lad, data = cfg.ladder, cfg.data
    start = time.time()
    tokenizer = build_tokenizer()
    with one_thread():
        model = init_model(spec, tokenizer, seed=lad.seed)
        total, non_embedding = count_params(model)
        test = held_out(data.test_size, data.max_digits, data.seed)
        # Pre-training never sees a held-out problem.
        pretrain(
            model,
            tokenizer,
            steps,
            lad.pretrain_batch,
            pretrain_lr(cfg, spec),
            data.max_digits,
            set(test),
            lad.pretrain_hardest_share,
            unboxed_share=lad.pretrain_unboxed_share,
            seed=lad.seed,
            on_steps=on_steps,
        )
        if spec.instruct_steps:  # the instruct family: boxed answers only
            pretrain(
                model,
                tokenizer,
                spec.instruct_steps,
                lad.pretrain_batch,
                pretrain_lr(cfg, spec),
                data.max_digits,
                set(test),
                lad.pretrain_hardest_share,
                unboxed_share=0.0,
                seed=lad.seed + 1,
                on_steps=on_steps,
            )
        rows = curriculum_order(to_rows(test, "+", "test"))
        stride = max(1, len(rows) // lad.eval_problems)  # an even slice of the difficulty range
        score = pass_at_1(
            model,
            tokenizer,
            rows[::stride][: lad.eval_problems],
            samples=lad.eval_samples,
            temperature=cfg.grpo.eval_temperature,
            max_new_tokens=data.max_digits + 10,
            seed=lad.seed,
        )
    entry = LadderEntry(
        spec.name,
        str(out),
        total,
        non_embedding,
        round(score, 4),
        steps + spec.instruct_steps,
        round(time.time() - start, 1),
    )
    # Write beside the final place, then rename: an interrupted build is never a cache hit.
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    save_model_dir(model, tokenizer, tmp)
    (tmp / ENTRY_FILE).write_text(json.dumps(asdict(entry), indent=1))
    try:
        tmp.rename(out)
    except OSError:  # another process finished the same model first; theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)
    return entry
