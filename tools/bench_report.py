"""Collect the sections' JSON into bench_out/bench.json and a markdown table, bench.md,
with ratios, shares of the measured matmul peak and the issue's targets."""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import OUT, machine  # noqa: E402


def load(name: str) -> dict | None:
    path = OUT / name
    if not path.is_file():
        return None
    if path.suffix == ".jsonl":
        lines = path.read_text().splitlines()
        return json.loads(lines[-1]) if lines else None
    return json.loads(path.read_text())


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def rollout_rows(rollout: dict, peak: dict) -> list[list[str]]:
    rows = []
    for m in rollout["models"]:
        p = peak["gflops"][m["dtype"]]
        hf, vl = m["hf"], m["vllm"]
        m["hf"]["share_of_peak"] = hf["gflops"] / p
        m["vllm"]["share_of_peak"] = vl["gflops"] / p
        big = m["matmul_params"] >= 20e6
        ok = m["ratio_vllm_over_hf"] >= 1 and vl["gflops"] / p >= 0.5
        rows.append(
            [
                f"rollout {m['model']} ({m['matmul_params'] / 1e6:.2f}M, {m['dtype']})",
                f"vLLM {vl['tokens_per_s']:,.0f} tok/s ({pct(vl['gflops'] / p)} of peak)",
                f"HF generate {hf['tokens_per_s']:,.0f} tok/s ({pct(hf['gflops'] / p)} of peak)",
                f"{m['ratio_vllm_over_hf']:.2f}x",
                "≥1x and ≥50% of peak: " + verdict(ok) if big else "(not a target below 25M)",
            ]
        )
    return rows


def sync_rows(rollout: dict) -> list[list[str]]:
    rows = []
    for m in rollout["models"]:
        s = m["sync"]
        b, w, t = s["bucketed"], s["wire"], s["per_tensor"]
        rows.append(
            [
                f"weight sync {m['model']} ({b['bytes'] / 1e6:.1f} MB)",
                f"bucketed, {b['transport']}: {b['seconds']:.3f} s, "
                f"{b['bytes_per_s'] / 1e9:.2f} GB/s ({pct(b['share_of_memcpy'])} of memcpy), "
                f"of which vLLM's reload {b['load_seconds']:.3f} s (alone "
                f"{pct(b['load_share_of_memcpy'])} of memcpy)",
                f"memcpy {s['memcpy_bytes_per_s'] / 1e9:.2f} GB/s; bucketed, {w['transport']}: "
                f"{w['seconds']:.3f} s ({pct(w['share_of_memcpy'])}); one tensor at a time: "
                f"{t['seconds']:.3f} s",
                f"{w['seconds'] / b['seconds']:.2f}x vs {w['transport']}",
                "≥50% of memcpy: " + verdict(b["share_of_memcpy"] >= 0.5),
            ]
        )
    return rows


def bf16_rows(rollout: dict) -> list[list[str]]:
    tune = rollout.get("tune") or {}
    if "bf16" not in tune:
        return []
    b = tune["bf16"]
    return [
        [
            f"rollout {tune['model']} bf16 ({tune['prompts']} prompts x {tune['n']}, pool 1x2)",
            f"bf16 {b['bf16_tokens_per_s']:,.0f} tok/s",
            f"fp32 {b['fp32_tokens_per_s']:,.0f} tok/s",
            f"{b['ratio']:.2f}x",
            "≥1.5x: " + verdict(b["ratio"] >= 1.5),
        ]
    ]


def grpo_rows(grpo: dict) -> list[list[str]]:
    rows = []
    for m in grpo["models"]:
        if "rayrl" not in m or "trl" not in m:
            continue
        r, t = m["rayrl"], m["trl"]
        split = ", ".join(f"{k} {v:.2f}" for k, v in r["split_seconds"].items())
        ratio = m["ratio_trl_over_rayrl"]
        updates = m.get("updates_per_step", 1)
        rows.append(
            [
                f"GRPO step {m['model']} ({m['prompts']}x{m['group']}, {m['max_new_tokens']} tok, "
                f"{updates} update{'s' if updates > 1 else ''}/step)",
                f"rayrl {r['seconds_per_step']:.2f} s/step ({split})",
                f"TRL GRPOTrainer {t['seconds_per_step']:.2f} s/step",
                f"{ratio:.2f}x (TRL/rayrl)",
                f"no slower (≥1x): {verdict(ratio >= 1)}",
            ]
        )
    return rows


def overlap_rows(overlap: dict) -> list[list[str]]:
    rows = []
    for m in overlap["models"]:
        o = m["overlap"]
        rows.append(
            [
                f"overlapped steps {m['model']} ({m['matmul_params'] / 1e6:.2f}M, async_steps 1)",
                f"{o['async']['seconds_per_step']:.2f} s/step",
                f"synchronous {o['sync']['seconds_per_step']:.2f} s/step; bound {o['bound']:.2f}x",
                f"{o['speedup']:.2f}x ({pct(o['share_of_bound'])} of the bound)",
                "≥80% of the bound: " + verdict(o["share_of_bound"] >= 0.8),
            ]
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--total-seconds", type=float)
    args = ap.parse_args()
    sections = {}
    log = OUT / "logs" / "sections.txt"
    if log.is_file():
        for line in log.read_text().splitlines():
            name, rc, secs = line.split()
            sections[name] = {"exit": int(rc), "seconds": int(secs)}
    peak, rollout, grpo = load("peak.json"), load("rollout.json"), load("grpo.json")
    overlap = load("overlap.json")
    rewards, fit, study = load("rewards.jsonl"), load("fit.json"), load("study.json")
    rows: list[list[str]] = []
    if peak:
        g = peak["gflops"]
        rows.append(
            [
                "matmul peak",
                f"fp32 {g['float32']:.0f} GFLOP/s",
                f"bf16 {g['bfloat16']:.0f} GFLOP/s",
                "",
                "",
            ]
        )
    if rollout and peak:
        rows += rollout_rows(rollout, peak)
    if rollout:
        rows += bf16_rows(rollout) + sync_rows(rollout)
    if grpo:
        rows += grpo_rows(grpo)
    if overlap:
        rows += overlap_rows(overlap)
    if rewards:
        ok = rewards["speedup_pool"] >= 2 and rewards["max_item_s"] < 10
        rows.append(
            [
                f"verifier ({rewards['items']} math items)",
                f"RewardPool ({rewards['rayrl_pool_workers']} actors) {rewards['rayrl_pool_per_s']:,.0f}/s; "
                f"in-process {rewards['rayrl_inprocess_per_s']:,.0f}/s",
                f"math-verify {rewards['math_verify_per_s']:,.0f}/s",
                f"{rewards['speedup_pool']:.2f}x pool, {rewards['speedup_inprocess']:.2f}x in-process",
                f"≥2x with timeouts kept: {verdict(ok)} (agreement {pct(rewards['agreement_with_math_verify'])})",
            ]
        )
    if fit:
        rows.append(
            [
                f"fitter ({fit['table']['runs']} runs x {fit['table']['points_per_run']} points)",
                f"fit {fit['fit_seconds']:.3f} s",
                f"1,000-draw bootstrap {fit['bootstrap_1000_seconds']:.1f} s",
                "",
                f"<1 s and <60 s: {verdict(fit['pass'])}",
            ]
        )
    if study:
        rows.append(
            [
                f"study outside the step loop ({study['study']}, {study['trials']} trials, {study['steps']} steps)",
                f"{study['outside_loop_seconds']:.0f} s of {study['wall_seconds']:.0f} s wall"
                f" (step loop {study['wall_seconds'] - study['outside_loop_seconds']:.0f} s)",
                f"all overhead {study['overhead_seconds']:.0f} s ({pct(study['overhead_share'])}), in-loop {study['in_loop_overhead_seconds']:.0f} s",
                pct(study["outside_loop_share"]),
                "<10%: " + verdict(study["outside_loop_share"] < 0.10),
            ]
        )
    head = ["benchmark", "rayrl", "alternative / ceiling", "ratio", "target"]
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    # The suite's time is the sum of its sections' (a section may have been run again alone).
    total = sum(v["seconds"] for v in sections.values()) or args.total_seconds
    md.append("")
    md.append(
        f"Suite wall time {total / 60:.1f} min (sections: "
        + ", ".join(f"{k} {v['seconds']} s" for k, v in sections.items())
        + f"); load average at the end {machine()['load_avg']} "
        "on 2 cores shared with other jobs."
        if total
        else ""
    )
    bench = {
        "total_seconds": total,
        "this_command_seconds": args.total_seconds,
        "sections": sections,
        "machine": machine(),
        "peak": peak,
        "rollout": rollout,
        "grpo": grpo,
        "overlap": overlap,
        "rewards": rewards,
        "fit": fit,
        "study": study,
        "table": rows,
    }
    failed = sorted(k for k, v in sections.items() if v["exit"] != 0)
    if failed:
        md.append(f"**Failed sections: {', '.join(failed)}** (see {OUT / 'logs'}).")
    (OUT / "bench.json").write_text(json.dumps(bench, indent=1, default=str))
    (OUT / "bench.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    if failed:  # tools/bench exits with this: a failed section fails the suite
        sys.exit(1)


if __name__ == "__main__":
    main()
