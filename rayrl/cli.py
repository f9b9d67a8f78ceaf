"""`rayrl <verb>`: models, train, study, fit, plan, eval, report."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

from rayrl.config import Config, ConfigError, load_config

SET_HELP = "override a config key, e.g. --set grpo.data_budget=32 (repeatable; YAML values)"


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

    from rayrl.study import run_cpus

    per_run = run_cpus(cfg, models)
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=False)
        else:
            cpus = num_cpus or max(os.cpu_count() or 1, math.ceil(per_run * runs))
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    have = ray.cluster_resources().get("CPU", 0.0)
    if have < per_run:
        raise ConfigError(
            f"{cfg.source}: one run reserves {per_run:g} logical CPUs (resources: "
            f"cpus_per_actor x its rollout, learner and reward actors) but the Ray cluster has "
            f"{have:g}; lower resources.cpus_per_actor or pass --num-cpus"
        )


def _overrides(pairs: list[str]) -> dict[str, Any]:
    """--set KEY=VALUE pairs as load_config overrides; each VALUE is read as YAML."""
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set: expected KEY=VALUE (e.g. grpo.data_budget=32), got {pair!r}")
        out[key] = yaml.safe_load(value)
    return out


def cmd_models(args: argparse.Namespace) -> None:
    from rayrl.models.ladder import build_ladder, format_table

    cfg = load_config(args.config, _overrides(args.set))
    print(format_table(build_ladder(cfg, progress=True)))


def cmd_convert(args: argparse.Namespace) -> None:
    from rayrl.models.convert import convert, converted, gguf_file

    out = convert(gguf_file(args.gguf), Path(args.out)) if args.out else converted(args.gguf)
    print(f"HF model directory written to {out}")


def cmd_train(args: argparse.Namespace) -> None:
    from rayrl.models.convert import is_gguf
    from rayrl.models.external import add_model, check_model_dir, check_models
    from rayrl.trainer import RunSpec, train

    cfg = load_config(args.config, _overrides(args.set))
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
    elif not (Path(model).expanduser().exists() or is_gguf(model)):
        names = ", ".join(s.name for s in cfg.ladder.models) or "none"
        raise ConfigError(
            f"{cfg.source}: key '--model' expected a ladder.models name (known: {names}) or an "
            f"HF model directory, got {model!r}, which is neither"
        )
    else:  # a model directory or GGUF file
        family = args.family or "base"
        check_model_dir(cfg, model, "--model")
        model = add_model(cfg, model, family)
    spec = RunSpec(
        model=model,
        rollout_n=args.rollout_n or cfg.grpo.rollout_n,
        reuse_factor=args.reuse_factor or cfg.grpo.reuse_factor,
        seed=cfg.grpo.seed if args.seed is None else args.seed,
        family=family,
    )
    _init_ray(cfg, args.num_cpus, models=[(spec.model, spec.family)])
    run_dir = Path(args.out) if args.out else None
    out = train(cfg, spec, run_dir, resume=args.resume)
    print(f"run written to {out}")


def cmd_study(args: argparse.Namespace) -> None:
    from rayrl.models.external import check_models
    from rayrl.study import run_study

    cfg = load_config(args.config, _overrides(args.set))
    if args.dry_run:  # the models live on the cluster's volume, so no check_models here
        from rayrl.dryrun import dry_run

        dry_run(cfg, placement_timeout_s=args.placement_timeout)
        return
    check_models(cfg, sorted({(t["model"], t["family"]) for t in cfg.trials()}))
    _init_ray(cfg, args.num_cpus, runs=cfg.study.max_concurrent)
    out = run_study(cfg, scheduler=not args.no_scheduler, out_dir=args.out)
    print(f"study written to {out}")


def cmd_fit(args: argparse.Namespace) -> None:
    from rayrl.scaling.commands import fit_command

    kwargs = {k: v for k, v in vars(args).items() if k not in ("verb", "func")}
    summary = fit_command(**kwargs)
    for name, fam in summary["families"].items():
        print(f"{name}: {fam['status']}" + "".join(f", {a}-axis law" for a in fam["laws"]))
    print(f"fit written to {args.out}")


def cmd_plan(args: argparse.Namespace) -> None:
    from rayrl.scaling.commands import plan_command

    print(plan_command(args.fit, compute_budget=args.compute_budget, data_budget=args.data_budget))


def cmd_report(args: argparse.Namespace) -> None:
    from rayrl.report import write_report

    print(f"report written to {write_report(Path(args.study_dir))}")


def main(argv: list[str] | None = None) -> int:
    from rayrl.scaling.commands import add_arguments_fit

    p = argparse.ArgumentParser(prog="rayrl", description=__doc__)
    sub = p.add_subparsers(dest="verb", required=True)

    m = sub.add_parser("models", help="the tiny model ladder")
    msub = m.add_subparsers(dest="action", required=True)
    b = msub.add_parser(
        "build", help="build (or reuse the cache of) the ladder and print its table"
    )
    b.add_argument("config")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    b.set_defaults(func=cmd_models)
    c = msub.add_parser(
        "convert", help="convert a GGUF (llama.cpp) checkpoint into an HF model directory"
    )
    c.add_argument("gguf", help="a .gguf file, or package:file.gguf inside a Python package")
    c.add_argument("out", nargs="?", help="directory to write (default: the cache, reused)")
    c.set_defaults(func=cmd_convert)

    t = sub.add_parser("train", help="one GRPO run")
    t.add_argument("config")
    t.add_argument("--model", help="ladder.models name, HF model directory or .gguf file")
    t.add_argument("--family", help="base or instruct (default: the listed model's, else base)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    t.add_argument("--rollout-n", type=int)
    t.add_argument("--reuse-factor", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--out", help="run directory (default: OUTPUT_DIR/RUN_ID)")
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    t.add_argument("--num-cpus", type=int)
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("study", help="the Tune search over model size x rollout n x reuse factor")
    s.add_argument("config")
    s.add_argument("--out", help="study directory (default: OUTPUT_DIR)")
    s.add_argument("--no-scheduler", action="store_true", help="run every trial to the end")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    s.add_argument("--num-cpus", type=int)
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

    f = sub.add_parser("fit", help="fit the scaling laws to a metrics table, per family")
    add_arguments_fit(f)
    f.set_defaults(func=cmd_fit)

    pl = sub.add_parser("plan", help="the planner's answer for a budget")
    pl.add_argument("fit", help="fit.json")
    pl.add_argument("--compute-budget", type=float)
    pl.add_argument("--data-budget", type=float)
    pl.set_defaults(func=cmd_plan)

    r = sub.add_parser("report", help="(re)write a study's report")
    r.add_argument("study_dir")
    r.set_defaults(func=cmd_report)

    args = p.parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"rayrl: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
