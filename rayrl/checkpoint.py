"""Checkpoints that can be trusted, and the HF export of any of them.

A run's checkpoints live in RUN_DIR/checkpoints/step<K>/: the learner ranks' DeepSpeed files,
the loop state (state.json), the overlapped loop's next rollout (pending.pkl), and the
model's config and tokenizer (hf/), so the folder alone is enough to resume from or to
export. A checkpoint is complete only once every one of its files is fsynced and its
manifest (manifest.json: each file's size and CRC-32) is written, last and atomically.

CRC-32, not SHA-256: the manifest guards against torn and truncated writes (a kill, a node
lost or a full disk mid-save), not against tampering. zlib's CRC-32 ran at 3.9 GiB/s here
against 1.7 GiB/s for hashlib's SHA-256 (one core, 256 MiB), it releases the GIL so the
files are summed in parallel threads, and a changed byte or a lost tail still shows, by its
checksum or its size.

The newest `grpo.checkpoint_keep` complete checkpoints are kept; older ones, and unfinished
folders older than the newest complete one, go once a newer one is complete. On resume the
newest checkpoint whose files match its manifest is used; each one that does not is named
on stderr and removed, and with none valid the run starts from step 0.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rayrl.storage import fsync_dir, write_bytes_atomic, writing

if TYPE_CHECKING:
    from rayrl.config import ResourcesConfig

CHECKPOINTS = "checkpoints"  # in a run's directory
MANIFEST = "manifest.json"  # in a checkpoint's folder, written last: the folder is complete
STATE = "state.json"  # in a checkpoint's folder: the loop state (step, compute, unique prompts)
HF_META = "hf"  # in a checkpoint's folder: the model's config and tokenizer
LEGACY_LATEST = "latest.json"  # in checkpoints/: the loop state, before checkpoints had manifests
HF_EXPORT = "hf"  # in a run's directory: its final policy as an HF model directory
_TAG = re.compile(r"step(\d+)")
_CHUNK = 16 << 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: names the folder and what is wrong with it."""


def folder(ckpt_dir: Path, step: int) -> Path:
    """The folder of step `step`'s checkpoint (its DeepSpeed tag is the folder's name)."""
    return Path(ckpt_dir) / f"step{step}"


def step_of(path: Path) -> int | None:
    m = _TAG.fullmatch(path.name)
    return int(m.group(1)) if m and path.is_dir() else None


def _folders(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Every checkpoint folder, newest first."""
    if not Path(ckpt_dir).is_dir():
        return []
    found = [(s, p) for p in Path(ckpt_dir).iterdir() if (s := step_of(p)) is not None]
    return sorted(found, reverse=True)


def prepare(ckpt_dir: Path, step: int) -> Path:
    """The empty folder for step `step`'s checkpoint: what an earlier attempt left there (a
    run resumed from before it) goes first, so no old manifest ever covers new files."""
    path = folder(ckpt_dir, step)
    if path.exists():
        shutil.rmtree(path)
    return path


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST)


def _sync_and_sum(path: Path) -> tuple[int, int]:
    """fsync a file's data, then its size and CRC-32 (read back from the page cache)."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        while chunk := f.read(_CHUNK):
            crc, size = zlib.crc32(chunk, crc), size + len(chunk)
    return size, crc


def _sum_all(path: Path, files: list[Path]) -> dict[str, dict[str, int]]:
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(files)))) as pool:
        sums = list(pool.map(_sync_and_sum, files))
    return {str(f.relative_to(path)): {"size": s, "crc32": c} for f, (s, c) in zip(files, sums)}


def save(learners: Any, ckpt_dir: Path, step: int) -> Path:
    """The learner ranks save step `step`'s DeepSpeed checkpoint into its (emptied) folder;
    returns the folder, which seal() then completes."""
    path = prepare(ckpt_dir, step)
    with writing(ckpt_dir, path.name):
        learners.save(str(ckpt_dir), path.name)
    return path


def seal(
    path: Path,
    state: dict[str, Any],
    keep: int,
    model_dir: str | None = None,
    files: dict[str, bytes] | None = None,
) -> None:
    """Complete the checkpoint in `path` (the learners have saved into it): write the loop
    state, `files` and the model's config and tokenizer, fsync every file and directory,
    write the manifest last, then delete what `keep` no longer keeps."""
    with writing(path, "a checkpoint"):
        for name, data in {**(files or {}), STATE: json.dumps(state).encode()}.items():
            (path / name).write_bytes(data)
        if model_dir is not None:
            copy_model_meta(model_dir, path / HF_META)
        listed = _files(path)
        manifest = {"step": state["step"], "checksum": "crc32", "files": _sum_all(path, listed)}
        for d in sorted({f.parent for f in listed} | {path}, key=lambda p: -len(p.parts)):
            fsync_dir(d)
        write_bytes_atomic(path / MANIFEST, json.dumps(manifest, indent=1).encode())
        fsync_dir(path.parent)
    prune(path.parent, keep)


def copy_model_meta(model_dir: str, dst: Path) -> None:
    """The model's config, generation config and tokenizer files: what an HF directory
    holds besides its weights."""
    dst.mkdir(parents=True, exist_ok=True)
    for src in Path(model_dir).iterdir():
        weights = src.suffix in (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
        if src.is_file() and not weights and not src.name.endswith(".index.json"):
            shutil.copy2(src, dst / src.name)


def verify(path: Path, checksums: bool = True) -> str | None:
    """What is wrong with the checkpoint in `path`, or None when every file matches its
    manifest (sizes only, without `checksums`)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        listed = manifest["files"]
    except FileNotFoundError:
        return "no manifest (its write never finished)"
    except (ValueError, KeyError, TypeError) as e:
        return f"unreadable manifest ({e})"
    files = {str(f.relative_to(path)): f for f in _files(path)}
    missing = sorted(set(listed) - set(files))
    if missing:
        return f"missing file(s) {missing}"
    for name, want in listed.items():
        size = files[name].stat().st_size
        if size != want["size"]:
            return f"{name} holds {size} bytes, its manifest says {want['size']}"
    if checksums:
        got = _sum_all(path, [files[n] for n in listed])
        for name, want in listed.items():
            if got[name]["crc32"] != want["crc32"]:
                return f"{name} fails its CRC-32"
    return None


def prune(ckpt_dir: Path, keep: int) -> list[Path]:
    """Delete every checkpoint older than the newest `keep` complete ones, and unfinished
    folders older than the newest complete one; returns what went."""
    found = _folders(ckpt_dir)
    complete = [s for s, p in found if (p / MANIFEST).exists()]
    if not complete:
        return []
    kept = set(complete[:keep])
    gone = [p for s, p in found if s not in kept and s < complete[0]]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def kept(ckpt_dir: Path) -> list[int]:
    """The steps of the complete checkpoints (manifest present), newest first."""
    return [s for s, p in _folders(ckpt_dir) if (p / MANIFEST).exists()]


def resume_point(ckpt_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint whose every file matches its manifest, and its loop state.
    Each newer one that fails is named on stderr and removed: the run recomputes its steps.
    A run written before manifests resumes from its latest.json, unchecked."""
    ckpt_dir = Path(ckpt_dir)
    found = _folders(ckpt_dir)
    if found and not any((p / MANIFEST).exists() for _, p in found):
        if (ckpt_dir / LEGACY_LATEST).exists():
            state = json.loads((ckpt_dir / LEGACY_LATEST).read_text())
            print(f"{ckpt_dir}: checkpoints without manifests, unchecked", file=sys.stderr)
            return folder(ckpt_dir, state["step"]), state
    for step, path in found:
        problem = verify(path)
        if problem is None:
            return path, json.loads((path / STATE).read_text())
        print(
            f"{path}: checkpoint of step {step} is not usable: {problem}; removed, "
            "resuming from an earlier one",
            file=sys.stderr,
            flush=True,
        )
        shutil.rmtree(path, ignore_errors=True)
    return None


def checkpoint_state(run_dir: Path) -> dict[str, Any] | None:
    """The loop state (step, compute, unique prompts) of a run's newest complete checkpoint
    whose files have their manifest's sizes, if any (resume_point also checks the sums)."""
    ckpt_dir = Path(run_dir) / CHECKPOINTS
    found = _folders(ckpt_dir)
    for _, path in found:
        if verify(path, checksums=False) is None:
            return json.loads((path / STATE).read_text())
    legacy = ckpt_dir / LEGACY_LATEST
    if legacy.exists() and not any((p / MANIFEST).exists() for _, p in found):
        return json.loads(legacy.read_text())
    return None


def storage_bytes(params: int, r: ResourcesConfig, keep: int) -> dict[str, int]:
    """Estimated bytes one run leaves on the study's volume: its `keep` checkpoints (the
    module's weights, bf16 under DeepSpeed's bf16 and fp32 otherwise, and the optimizer's
    state: Adam's two moments, 8 bytes a parameter, and an fp32 master copy, 4 more, where
    ZeRO partitions or the weights are bf16; a one-rank fp32 learner at stage 0 has none)
    and its final export."""
    weights = 2 if r.engine_bf16 else 4
    master = 4 if r.engine_bf16 or r.learner_zero_stage > 0 else 0
    return {"checkpoints": keep * params * (weights + 8 + master), "export": params * weights}


# --- HF export -------------------------------------------------------------------------------
def checkpoint_weights(path: Path) -> dict[str, Any]:
    """The full fp32 weights of a checkpoint folder, ZeRO-1/2/3 shards merged (DeepSpeed's
    zero_to_fp32); a ZeRO-0 checkpoint's module state as saved."""
    import torch

    if any(path.glob("*zero_pp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    states = path / "mp_rank_00_model_states.pt"
    if not states.exists():
        raise CheckpointError(f"{path}: no DeepSpeed model states to export")
    return torch.load(states, map_location="cpu", weights_only=False)["module"]


def export(path: Path, out: Path, model_dir: str | None = None) -> Path:
    """Write the checkpoint in `path` as an HF model directory `out` (config, safetensors,
    tokenizer) that transformers and vLLM load; the config and tokenizer are the
    checkpoint's own, else `model_dir`'s. Written beside `out` and renamed into place:
    `out` is whole or absent."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path, out = Path(path), Path(out)
    if (problem := verify(path)) is not None:
        raise CheckpointError(f"{path}: cannot export: {problem}")
    meta = path / HF_META
    if not (meta / "config.json").exists():
        if model_dir is None:
            raise CheckpointError(f"{path}: no {HF_META}/config.json (written before exports)")
        meta = Path(model_dir)
    config = AutoConfig.from_pretrained(meta)
    # The model's own dtype (bf16 for the paper's grids, fp32 for the tiny ladder), cast
    # from DeepSpeed's fp32 master weights.
    dtype = getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    state = {k: v.to(dtype) for k, v in checkpoint_weights(path).items()}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    params = dict(model.named_parameters(remove_duplicate=False))  # tied ones under each name
    untied = [k for k in missing if k not in params or params[k].is_meta]
    if untied or unexpected:
        raise CheckpointError(
            f"{path}: weights do not fit {meta}/config.json: missing {untied}, unexpected "
            f"{unexpected}"
        )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with writing(out.parent, out.name):
        try:
            copy_model_meta(str(meta), tmp)
            model.save_pretrained(tmp, safe_serialization=True)
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            fsync_dir(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    return out


def export_final(
    run_dir: Path, step: int, model_dir: str, trained: bool, enabled: bool = True
) -> Path | None:
    """The run's final policy as RUN_DIR/hf, from its last checkpoint: after a run that
    `trained` up to it, or where it is missing (a run finished before exports). Not
    `enabled` (grpo.export_final false): a pointer to `rayrl export` instead."""
    if not enabled:
        print(f"{run_dir}: no final export (grpo.export_final false); `rayrl export {run_dir}`")
        return None
    out, last = Path(run_dir) / HF_EXPORT, folder(Path(run_dir) / CHECKPOINTS, step)
    if not trained and (out.exists() or not (last / MANIFEST).exists()):
        return None
    return export(last, out, model_dir)


def export_run(run_dir: Path, step: int | None = None, out: Path | None = None) -> Path:
    """`rayrl export`: checkpoint `step` (default: the newest valid one) of a run as an HF
    directory, by default RUN_DIR/hf-step<K>."""
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / CHECKPOINTS
    steps = kept(ckpt_dir)
    if not steps:
        raise CheckpointError(f"{ckpt_dir}: no complete checkpoint to export")
    if step is None:
        point = next(((s, p) for s, p in _folders(ckpt_dir) if verify(p) is None), None)
        if point is None:
            raise CheckpointError(f"{ckpt_dir}: no checkpoint matches its manifest")
        step = point[0]
    elif step not in steps:
        raise CheckpointError(
            f"{ckpt_dir}: --step expected one of the kept checkpoints {sorted(steps)}, got {step}"
        )
    return export(folder(ckpt_dir, step), out or run_dir / f"hf-step{step}")
