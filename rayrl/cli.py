"""`rayrl <verb>`: config, models, train, study, fit, plan, report, export."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

from rayrl.config import Config, ConfigError, load_config
from rayrl.metrics import AXES
from rayrl.scaling.bootstrap import N_BOOT

SET_HELP = "override a config key, e.g. --set grpo.data_budget=32 (repeatable; YAML values)"


class FitFailed(RuntimeError):
    """A verb that ran but produced no law or no plan: exit 1, after its message."""


def _init_ray(
    cfg: Config,
    num_cpus: int | None = None,
    runs: int = 1,
    models: list[tuple[str, str]] | None = None,
) -> None:
    """Join a running cluster when there is one (ray job submit, KubeRay), else start locally
    with enough logical CPUs for `runs` concurrent runs of the largest of `models` (default:
    the study's; more than the cores is fine: a run's actors take turns), and fail clearly
    where the cluster is too small to start one."""
    import ray

    from rayrl.study import run_bundles, run_cpus
    from rayrl.study.dryrun import connect

    per_run = run_cpus(cfg, models)
    # A cluster of its own, maybe autoscaling; Ray's "local" means start one here.
    joined = os.environ.get("RAY_ADDRESS", "") not in ("", "local")
    if not ray.is_initialized():
        if joined:
            connect()
        else:
            cpus = num_cpus or max(os.cpu_count() or 1, math.ceil(per_run * runs))
            # "local": a new Ray of its own, never one that `ray start` left on this machine
            # (ray.init's default joins that and then refuses num_cpus).
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    have = ray.cluster_resources().get("CPU", 0.0)
    # A local Ray that rayrl started is what it is (its monitor has no node types to add).
    if have < per_run and not (joined and can_scale_to(per_run, run_bundles(cfg, models))):
        raise ConfigError(
            f"{cfg.source}: one run reserves {per_run:g} logical CPUs (resources: "
            f"cpus_per_actor x its rollout, learner and reward actors) but the Ray cluster has "
            f"{have:g} and no autoscaler that can add them; lower resources.cpus_per_actor or "
            "pass --num-cpus"
        )


SCALE_TIMEOUT_S = 600.0  # how long an autoscaler may take to bring up one run's nodes


def can_scale_to(cpus: float, bundles: list[dict[str, float]]) -> bool:
    """Can the cluster ever hold one run? An autoscaling cluster (KubeRay, Ray's autoscaler)
    starts with what it needs: where it publishes its node groups' limits they decide; else,
    with an autoscaler running, it is asked for one run's bundles and given SCALE_TIMEOUT_S
    to bring them up (Tune's own requests take over from there)."""
    import time

    import ray
    from ray._private import ray_constants
    from ray._private.state import state  # Ray Train's start-up check reads the same
    from ray.autoscaler.sdk import request_resources
    from ray.experimental.internal_kv import _internal_kv_get

    limits = state.get_max_resources_from_cluster_config() or {}
    if limits.get("CPU", 0) >= cpus:
        return True
    if not _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS):
        return False  # no autoscaler: the cluster is what it is
    print(f"rayrl: asking the autoscaler for one run's {cpus:g} CPUs", file=sys.stderr, flush=True)
    request_resources(bundles=bundles)
    deadline = time.monotonic() + SCALE_TIMEOUT_S
    try:
        while ray.cluster_resources().get("CPU", 0.0) < cpus:
            if time.monotonic() > deadline:
                return False
            time.sleep(1)
    finally:
        request_resources(bundles=[])  # no standing floor: the study's trials ask for theirs
    return True


def _overrides(pairs: list[str]) -> dict[str, Any]:
    """--set KEY=VALUE pairs as load_config overrides; each VALUE is read as YAML."""
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set: expected KEY=VALUE (e.g. grpo.data_budget=32), got {pair!r}")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: the value is not valid YAML ({e})") from None
    return out


def _config(args: argparse.Namespace, **flags: Any) -> Config:
    """The config file with --set and the verb's own flags as overrides, validated: a flag
    is an override like any other, never a value set after validation."""
    overrides = _overrides(args.set)
    overrides.update({k: v for k, v in flags.items() if v is not None})
    return load_config(args.config, overrides)


def cmd_config(args: argparse.Namespace) -> None:
    import dataclasses

    import yaml

    raw = dataclasses.asdict(_config(args))
    raw.pop("source")
    print(yaml.safe_dump(raw, sort_keys=False), end="")


def cmd_models(args: argparse.Namespace) -> None:
    from rayrl.models.ladder import build_ladder, format_table

    print(format_table(build_ladder(_config(args), progress=True)))


def cmd_convert(args: argparse.Namespace) -> None:
    from rayrl.models.convert import convert, converted, gguf_file

    out = convert(gguf_file(args.gguf), Path(args.out)) if args.out else converted(args.gguf)
    print(f"HF model directory written to {out}")


def cmd_train(args: argparse.Namespace) -> None:
    from rayrl.models.convert import is_gguf
    from rayrl.models.external import add_model, check_model_dir, check_models, is_hub_id
    from rayrl.trainer import train
    from rayrl.trial import Trial

    cfg = _config(
        args,
        **{
            "grpo.rollout_n": args.rollout_n,
            "grpo.reuse_factor": args.reuse_factor,
            "grpo.seed": args.seed,
        },
    )
    # Default: the middle model of the study grid.
    model = args.model or (
        cfg.study.models[len(cfg.study.models) // 2] if cfg.study.models else None
    )
    if model is None:
        raise ConfigError(f"{args.config}: pass --model NAME or list models under study.models")
    # Every model is checked here, before Ray starts.
    if any(s.name == model for s in cfg.ladder.models):
        family = cfg.model(model, args.family).family  # an unknown family fails here
        check_models(cfg, [(model, family)])
    elif not (Path(model).expanduser().exists() or is_gguf(model) or is_hub_id(model)):
        names = ", ".join(s.name for s in cfg.ladder.models) or "none"
        raise ConfigError(
            f"{cfg.source}: key '--model' expected a ladder.models name (known: {names}), an "
            f"HF model directory or a hub id (org/name), got {model!r}, which is none of these"
        )
    else:  # a model directory, hub id or GGUF file
        family = args.family or "base"
        check_model_dir(cfg, model, "--model")
        model = add_model(cfg, model, family)
    g = cfg.grpo
    trial = Trial(model, family, g.rollout_n, g.reuse_factor, g.seed)
    from rayrl.data.task import check_data

    check_data(cfg)  # every data file and row, before Ray starts (rayrl/data/SCHEMA.md)
    _init_ray(cfg, args.num_cpus, models=[(trial.model, trial.family)])
    run_dir = Path(args.out) if args.out else Path(cfg.output_dir) / trial.run_id
    from rayrl.storage import writing
    from rayrl.study.trackers import RunTrackers

    params = {"trial": trial.to_params()}  # as a study's trial has them
    with (
        writing(run_dir),  # a full disk: named, exit 1
        RunTrackers(cfg, run_dir, trial.run_id, params) as trackers,  # study.trackers
    ):
        out = train(
            cfg, trial, run_dir, resume=args.resume, on_row=trackers.row, on_step=trackers.step
        )
    print(f"run written to {out}")


def cmd_study(args: argparse.Namespace) -> None:
    from rayrl.models.external import check_models
    from rayrl.study import run_study

    cfg = _config(args)
    if args.dry_run:  # the models live on the cluster's volume, so no check_models here
        from rayrl.study.dryrun import dry_run

        dry_run(cfg, placement_timeout_s=args.placement_timeout)
        return
    if args.no_scheduler:
        cfg.study.scheduler = False
    from rayrl.extras import check_trackers

    check_trackers(cfg)  # a tracker's package missing: exit 2 here, not after Ray starts
    check_models(cfg, sorted({(t.model, t.family) for t in cfg.trials()}))
    from rayrl.data.task import check_data

    check_data(cfg)
    out_dir = Path(args.out or cfg.output_dir)
    from rayrl.study.resume import check_resume

    check_resume(cfg, out_dir, restart_changed=args.restart_changed)  # before Ray starts
    _init_ray(cfg, args.num_cpus, runs=cfg.study.max_concurrent)
    from rayrl.storage import writing

    with writing(out_dir):  # a full disk anywhere below (Tune's own files too): named, exit 1
        print(f"study written to {run_study(cfg, out_dir=str(out_dir))}")


def cmd_fit(args: argparse.Namespace) -> None:
    from rayrl.scaling.document import fit_command

    if args.n_boot < 0:
        raise ConfigError(f"--n-boot: expected 0 (no intervals) or more draws, got {args.n_boot}")
    if not 0 < args.fit_fraction < 1:
        raise ConfigError(f"--fit-fraction: expected a share in (0, 1), got {args.fit_fraction}")
    kwargs = {k: v for k, v in vars(args).items() if k not in ("verb", "func")}
    summary = fit_command(**kwargs)
    for name, fam in summary["families"].items():
        print(f"{name}: {fam['status']}" + "".join(f", {a}-axis law" for a in fam["laws"]))
        for w in fam.get("warnings", []):
            print(f"  warning: {w}")
    print(f"fit written to {args.out}")
    if not any(fam["laws"] for fam in summary["families"].values()):
        raise FitFailed(
            f"{args.metrics}: no law could be fitted ("
            + "; ".join(
                f"{n}: {f.get('error', f['status'])}" for n, f in summary["families"].items()
            )
            + ")"
        )


def cmd_plan(args: argparse.Namespace) -> None:
    from rayrl.scaling.document import plan_command

    text, planned = plan_command(
        args.fit_json, args.compute_budget, args.data_budget, family=args.family
    )
    print(text)
    if not planned:
        raise FitFailed(f"{args.fit_json}: no plan for the budgets given")


def cmd_export(args: argparse.Namespace) -> None:
    from rayrl.checkpoint import export_run

    out = export_run(Path(args.run_dir), args.step, Path(args.out) if args.out else None)
    print(f"HF model directory written to {out}")


def cmd_report(args: argparse.Namespace) -> None:
    from rayrl.study import write_report

    print(f"report written to {write_report(Path(args.study_dir))}")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rayrl")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _config_args(q: argparse.ArgumentParser) -> None:
    q.add_argument("config", help="a YAML config (see configs/)")
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)


def _config_verb(sub: Any) -> None:
    """`rayrl config`."""
    cf = sub.add_parser(
        "config", help="print the resolved config (file, --set overrides, defaults)"
    )
    _config_args(cf)
    cf.set_defaults(func=cmd_config)


def _models_verb(sub: Any) -> None:
    """`rayrl models build|convert`."""
    m = sub.add_parser("models", help="the tiny model ladder")
    msub = m.add_subparsers(dest="action", required=True)
    b = msub.add_parser(
        "build", help="build (or reuse the cache of) the ladder and print its table"
    )
    _config_args(b)
    b.set_defaults(func=cmd_models)
    c = msub.add_parser(
        "convert", help="convert a GGUF (llama.cpp) checkpoint into an HF model directory"
    )
    c.add_argument("gguf", help="a .gguf file, or package:file.gguf inside a Python package")
    c.add_argument("out", nargs="?", help="directory to write (default: the cache, reused)")
    c.set_defaults(func=cmd_convert)


def _train_verb(sub: Any) -> None:
    """`rayrl train`."""
    t = sub.add_parser("train", help="one GRPO run")
    _config_args(t)
    t.add_argument(
        "--model", help="ladder.models name, HF model directory, hub id (org/name) or .gguf file"
    )
    t.add_argument("--family", help="base or instruct (default: the listed model's, else base)")
    t.add_argument("--rollout-n", type=int, help="samples per prompt (= --set grpo.rollout_n=N)")
    t.add_argument(
        "--reuse-factor", type=int, help="data reuse tau (= --set grpo.reuse_factor=TAU)"
    )
    t.add_argument("--seed", type=int, help="the run's seed (= --set grpo.seed=S)")
    t.add_argument("--out", help="run directory (default: OUTPUT_DIR/RUN_ID)")
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    t.add_argument(
        "--num-cpus", type=int, help="logical CPUs of a local Ray (default: what a run needs)"
    )
    t.set_defaults(func=cmd_train)


def _study_verb(sub: Any) -> None:
    """`rayrl study`."""
    s = sub.add_parser("study", help="the Tune search over model size x rollout n x reuse factor")
    _config_args(s)
    s.add_argument("--out", help="study directory (default: OUTPUT_DIR)")
    s.add_argument(
        "--no-scheduler", action="store_true", help="run every trial to the end (study.scheduler)"
    )
    s.add_argument(
        "--restart-changed",
        action="store_true",
        help="resume a study whose config changed in a key that changes runs: the runs it "
        "touches start again from step 0",
    )
    s.add_argument(
        "--num-cpus", type=int, help="logical CPUs of a local Ray (default: what the study needs)"
    )
    s.add_argument(
        "--dry-run",
        action="store_true",
        help="print each trial's bundles and GPU memory estimate, place its placement group on "
        "the running cluster and remove it; start nothing (exit 2 if a trial cannot fit)",
    )
    s.add_argument(
        "--placement-timeout",
        type=float,
        metavar="S",
        help="--dry-run: seconds to wait for each placement group (default: a minute)",
    )
    s.set_defaults(func=cmd_study)


def _fit_verb(sub: Any) -> None:
    """`rayrl fit`."""
    f = sub.add_parser("fit", help="fit the scaling laws to a metrics table, per family")
    f.add_argument("metrics", help="METRICS.parquet or METRICS.csv")
    f.add_argument("--x", choices=sorted(AXES), default="compute", help="the resource axis X")
    f.add_argument(
        "--protocol",
        choices=["intra", "inter"],
        default=None,
        help="also check predictions: intra (each run's start predicts its rest) or inter "
        "(smaller sizes predict the largest)",
    )
    f.add_argument(
        "--fit-fraction",
        type=float,
        default=0.25,
        help="intra protocol: the share of each run's points the prediction is fitted on",
    )
    f.add_argument("--out", default="fit.json", help="the fit document to write")
    f.add_argument("--no-figures", dest="figures", action="store_false", help="write no PNGs")
    f.add_argument("--family", default=None, help="fit one model family (default: each)")
    f.add_argument(
        "--rollout-n",
        type=int,
        default=None,
        help="the main law's group size (default: the one most model sizes ran at tau = 1)",
    )
    f.add_argument(
        "--n-boot", type=int, default=N_BOOT, help="bootstrap draws over whole runs (0: none)"
    )
    f.add_argument(
        "--metric",
        default="test_loss",
        help="the loss to fit: test_loss (1 - pass@1) or pass_at_<k> (1 - pass@k, grpo.pass_k)",
    )
    f.add_argument(
        "--E-form",
        dest="E_form",
        choices=["free", "smooth"],
        default="free",
        help="E(N) per size (free) or the paper's smooth form in N",
    )
    f.add_argument(
        "--loss", choices=["linear", "huber"], default="linear", help="least squares or Huber"
    )
    f.set_defaults(func=cmd_fit)


def _plan_verb(sub: Any) -> None:
    """`rayrl plan`."""
    pl = sub.add_parser("plan", help="the planner's answer for a budget")
    pl.add_argument("fit_json", help="fit.json written by `rayrl fit` or a study")
    pl.add_argument(
        "--compute-budget", type=float, help="training compute in FLOPs per run (eq. 5)"
    )
    pl.add_argument("--data-budget", type=float, help="training samples (prompts) per run (eq. 7)")
    pl.add_argument("--family", default=None, help="plan one model family (default: each)")
    pl.set_defaults(func=cmd_plan)


def _report_verb(sub: Any) -> None:
    """`rayrl report`."""
    r = sub.add_parser("report", help="(re)write a study's report")
    r.add_argument("study_dir")
    r.set_defaults(func=cmd_report)


def _export_verb(sub: Any) -> None:
    """`rayrl export`."""
    e = sub.add_parser(
        "export", help="a run's checkpoint as an HF model directory (transformers, vLLM)"
    )
    e.add_argument("run_dir", help="a run's directory (holds checkpoints/)")
    e.add_argument("--step", type=int, help="a kept checkpoint's step (default: the newest valid)")
    e.add_argument("--out", help="directory to write (default: RUN_DIR/hf-step<K>)")
    e.set_defaults(func=cmd_export)


VERBS = (
    _config_verb,
    _models_verb,
    _train_verb,
    _study_verb,
    _fit_verb,
    _plan_verb,
    _report_verb,
    _export_verb,
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rayrl", description=__doc__)
    p.add_argument("--version", action="version", version=f"rayrl {_version()}")
    sub = p.add_subparsers(dest="verb", required=True)
    for verb in VERBS:
        verb(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"rayrl: error: {e}", file=sys.stderr)
        return 2
    except FitFailed as e:
        print(f"rayrl: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rayrl: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a failure, not bad input: its message, the trace on request
        if os.environ.get("RAYRL_DEBUG"):
            raise
        print(
            f"rayrl: failed: {type(e).__name__}: {e} (RAYRL_DEBUG=1 shows where)", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
