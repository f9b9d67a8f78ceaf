"""One typed config for every rayrl verb.

YAML files in configs/ map one-to-one onto these dataclasses. Defaults hold the
paper's GRPO values (Tan et al., appendix A.2). Validation runs before any actor
starts; errors name the file, the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rayrl.search import SearchError, label, points, variants
from rayrl.trial import Trial


class ConfigError(ValueError):
    """A config file that cannot be used: names the file, the key and what was expected."""


@dataclass
class ModelSpec:
    """One model of a study. Without `path` it is a tiny ladder model that rayrl builds
    (Qwen2 architecture, members differ only in width and depth); with `path` it is an
    existing HF model directory, e.g. Qwen2.5-7B on a cluster's shared storage."""

    name: str
    hidden: int = 0
    layers: int = 0
    path: str = ""
    family: str = "base"
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 0  # 0 means 4 * hidden (mlp_width)
    tie_embeddings: bool = False
    # A second pre-training stage of this many steps on \boxed{} answers only, after the base
    # stage: the tiny ladder's "instruct" family, which has unlearned the bare-answer habit.
    instruct_steps: int = 0
    # This model's pools over the top-level `resources` (any key but device), e.g.
    # {tensor_parallel: 2, learners: 8} for a 0.5B model in a grid sized for 72B.
    resources: dict[str, Any] = field(default_factory=dict)

    @property
    def mlp_width(self) -> int:
        """The MLP's intermediate width: `intermediate`, or 4 * hidden when that is 0."""
        return self.intermediate or 4 * self.hidden


# Head sizes that vLLM's CPU attention backend supports (vllm/v1/attention/backends/cpu_attn.py).
CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


@dataclass
class LadderConfig:
    """The embedded tiny model ladder and its base pre-training."""

    models: list[ModelSpec] = field(default_factory=list)
    # Steps = max(pretrain_min_steps, tokens_per_param * N / tokens per step): equal steps or
    # equal tokens per parameter, never equal wall time (rayrl/DESIGN.md, measured hints).
    pretrain_tokens_per_param: float = 0.0
    pretrain_min_steps: int = 1500
    pretrain_batch: int = 64
    # The rate at pretrain_lr_width; wider models take lr * width / hidden (muP for Adam).
    pretrain_lr: float = 3e-3
    pretrain_lr_width: int = 32
    # Share of max-digit problems in the pre-training corpus; the rest spreads over fewer digits.
    pretrain_hardest_share: float = 0.2
    # Share of corpus answers written bare, without \boxed{}: the format habit base models
    # bring to RL (the verifier scores them 0), shared by every problem, so RL can unlearn it.
    pretrain_unboxed_share: float = 0.0
    eval_problems: int = 500  # held-out problems behind the table's pass@1
    eval_samples: int = 4  # samples per problem at grpo.eval_temperature
    seed: int = 0
    dir: str = "~/.cache/rayrl/ladder"  # RAYRL_CACHE, when set, wins: $RAYRL_CACHE/ladder


@dataclass
class DataConfig:
    """Where prompts come from: the synthetic task or guru-format parquet."""

    source: Literal["synthetic", "guru"] = "synthetic"
    train_path: str = ""  # guru: a parquet file or a `datasets` name
    test_path: str = ""  # guru: the held-out file
    eval_paths: list[str] = field(default_factory=list)
    test_size: int = 500
    train_size: int = 20000
    # Problems per evaluation set: each synthetic variant, or a seeded subset of each
    # eval_paths file; every evaluation scores them all next to the held-out test set.
    eval_size: int = 200
    max_digits: int = 3  # synthetic difficulty knob
    # synthetic prompts: "compact" ("Q:a+b=?A:", the tiny ladder's), "math" ("What is a plus
    # b?" in the paper's math template) or "calc" ("Calculate a + b. Give the final answer as
    # \boxed{number}.", for small chat models); see rayrl.data.synthetic.prompt_text
    prompt_style: Literal["compact", "math", "calc"] = "compact"
    # The order of each pass over a run's prompts: easy to hard (the paper's curriculum), or
    # shuffled once by the run's seed, so every stretch of a run holds every difficulty.
    order: Literal["curriculum", "shuffled"] = "curriculum"
    seed: int = 0


@dataclass
class GRPOConfig:
    """GRPO hyperparameters; defaults are the paper's (appendix A.2)."""

    lr: float = 1e-6
    clip_low: float = 0.2
    clip_high: float = 0.2
    # Dual clip: for A < 0 the surrogate loss is capped at -clip_ratio_c * A (veRL's default).
    clip_ratio_c: float = 3.0
    kl_coef: float = 0.001
    # Estimator of KL(pi || pi_ref) per sampled token; k3 is veRL's low_var_kl (clamped).
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    # veRL's loss aggregations, each over the whole mini-batch (every rank, every micro-batch);
    # seq-mean-token-sum-norm is Dr. GRPO's: token sums over (sequences x max_new_tokens).
    loss_agg: Literal[
        "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"
    ] = "token-mean"
    # The policy-gradient term (rayrl/learner/grpo.py): ppo_clip, the paper's token-level
    # clipped surrogate; gspo, one ratio per sequence (the geometric mean of its tokens'),
    # clipped at the sequence level by gspo_clip_low/high; cispo, REINFORCE times the
    # stop-gradient importance weight min(ratio, 1 + cispo_clip_high).
    policy_loss: Literal["ppo_clip", "gspo", "cispo"] = "ppo_clip"
    gspo_clip_low: float = 3e-4  # GSPO paper (v2) section 5.1, as TRL's GSPO recipe
    gspo_clip_high: float = 4e-4
    cispo_clip_high: float = 3.0  # IS weight capped at 4 (Tinker's CISPO default, after ScaleRL)
    # Advantages: group_std, (r - group mean) / (group std + adv_eps), the paper's; none,
    # r - group mean (Dr. GRPO); batch_std, r - group mean over the batch's std of that (ScaleRL).
    adv_norm: Literal["group_std", "none", "batch_std"] = "group_std"
    adv_eps: float = 1e-6
    prompts_per_step: int = 64
    # Optimizer updates per rollout batch: the paper takes 512 prompts a step in mini-batches
    # of 128. pi_old is the policy before the first of them.
    mini_batches: int = 4
    ppo_epochs: int = 1  # passes over the rollout batch per step
    rollout_n: int = 8
    temperature: float = 1.0
    eval_temperature: float = 0.7
    max_prompt_tokens: int = 2048
    max_new_tokens: int = 4096
    micro_batch: int = 32  # samples per learner forward/backward
    # > 0: micro-batches by tokens instead: each mini-batch sorted by length and cut so that
    # a micro-batch's padded size (samples x longest) stays under this many tokens (a longer
    # sample goes alone). The loss denominator stays the mini-batch's: the same update.
    micro_batch_tokens: int = 0
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    data_budget: int = 51200  # D_total: training samples (prompts) over the run, repeats included
    reuse_factor: int = 1  # tau
    eval_every: int = 10
    eval_samples: int = 4  # samples per held-out problem for pass@1
    checkpoint_every: int = 10
    # Complete checkpoints kept per run (rayrl/checkpoint.py): older ones are deleted once a
    # newer one is complete. 2 leaves one to fall back to if the newest turns out corrupt.
    checkpoint_keep: int = 2
    # Write the final policy as RUN_DIR/hf when the run ends. It builds full fp32 weights in
    # the trial's process, which a ZeRO-3 run of a large model cannot hold: false leaves the
    # sharded checkpoints, and `rayrl export RUN_DIR` builds it where memory allows.
    export_final: bool = True
    seed: int = 0
    # 1 overlaps the loop: step t+1 generates while step t learns, so its samples are one
    # update stale. 0 is the paper's synchronous loop.
    async_steps: int = 0
    # Truncated importance sampling of an off-policy rollout (async_steps 1, or a vLLM dtype
    # other than float32): each token's policy gradient times min(pi_old / pi_vLLM, is_cap),
    # the TIS correction of veRL and OpenRLHF (their cap is 2 too).
    is_cap: float = 2.0
    # DAPO's dynamic sampling: a group whose rewards all agree is dropped, and the next prompts
    # of the reuse schedule are drawn (only as many as are missing) until the step has
    # prompts_per_step informative groups or max_gen_rounds rounds ran; the step then trains
    # on what it has. Every drawn prompt counts in data_samples (and its generation in
    # compute_flops_all), so the data budget is spent sooner and the run may end in fewer
    # steps than data_budget / prompts_per_step; the schedule itself is unchanged.
    dynamic_sampling: bool = False
    max_gen_rounds: int = 4
    # Responses cut at max_new_tokens: none, trained on as any other; mask, left out of the
    # loss (DAPO's overlong filtering); penalty, DAPO's soft punishment added to the reward,
    # 0 up to max_new_tokens - overlong_buffer tokens, then linear down to -1 at max_new_tokens.
    overlong: Literal["none", "mask", "penalty"] = "none"
    overlong_buffer: int = 4096  # L_cache of the penalty (DAPO's 4,096 of 20,480)
    # Each evaluation's unbiased pass@k per set, 1 - C(n - c, k) / C(n, k) over the
    # eval_samples = n draws per problem (Chen et al. 2021), as pass_at_<k> columns.
    pass_k: list[int] = field(default_factory=lambda: [1])

    @property
    def steps(self) -> int:
        """Optimizer steps of one run: D_total / prompts per step."""
        return self.data_budget // self.prompts_per_step


@dataclass
class ResourcesConfig:
    """Device and actor pools; GPU is a switch on the same code path."""

    device: Literal["cpu", "gpu"] = "cpu"
    rollout_workers: int = 1
    tensor_parallel: int = 1
    learners: int = 1
    reward_workers: int = 1
    zero_stage: int = 2
    cpus_per_actor: float = 1.0
    vllm_kv_cache_gib: float = 1.0
    # vLLM's weights and activations; anything but float32 makes the rollout off-policy to
    # the fp32 learner, which truncated importance sampling corrects (grpo.is_cap).
    vllm_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Memory of one GPU, which `rayrl study --dry-run` checks each actor's estimate against
    # (GiB: an A100 80 GB has 80, an H100 80 GB 79.6, an H200 140).
    gpu_memory_gib: float = 80.0
    # Recompute each decoder layer's activations in backward instead of keeping them: the
    # learner then holds one hidden state per layer, what 14B-72B at 6K tokens need to fit.
    gradient_checkpointing: bool = False
    # The learner's matmul precision. bfloat16 keeps fp32 master weights and optimizer
    # states (autocast on CPU, where AMX runs bf16 matmuls ~2x fp32; DeepSpeed's bf16 on
    # GPU); auto is bfloat16 on GPU and float32 on CPU.
    learner_dtype: Literal["auto", "float32", "bfloat16"] = "auto"

    @property
    def learner_bf16(self) -> bool:
        """Does the learner compute in bf16 (`learner_dtype`, auto by device)?"""
        return self.learner_dtype == "bfloat16" or (
            self.learner_dtype == "auto" and self.device == "gpu"
        )

    @property
    def engine_bf16(self) -> bool:
        """DeepSpeed's bf16 (GPU): bf16 weights with fp32 masters. A CPU learner keeps fp32
        weights and autocasts its matmuls."""
        return self.device == "gpu" and self.learner_bf16

    @property
    def learner_zero_stage(self) -> int:
        """The ZeRO stage the learner's engine runs: zero_stage, except that stages 1 and 2
        over one rank shard nothing and cost a flat-buffer copy and a reduction each update
        (0.19 s against 0.05 s at stage 0, rand-25m), so one rank runs stage 0."""
        return 0 if self.learners == 1 and self.zero_stage in (1, 2) else self.zero_stage


@dataclass
class SweepConfig:
    """A named sub-grid of the study; an axis left empty takes the study's own list."""

    name: str
    models: list[str] = field(default_factory=list)
    rollout_n: list[int] = field(default_factory=list)
    reuse_factor: list[int] = field(default_factory=list)
    family: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    # Over the study's search: this sweep's own keys (a one-value list fixes a key).
    search: dict[str, Any] = field(default_factory=dict)


# A sweep's (and the study's) list field -> the Trial field its values fill.
SWEEP_AXES = {
    "models": "model",
    "family": "family",
    "rollout_n": "rollout_n",
    "reuse_factor": "reuse_factor",
    "seeds": "seed",
}


@dataclass
class StudyConfig:
    """The Tune search space and scheduling.

    Without sweeps the study is the full product of the axes below. With sweeps it is
    the union of their products, so a size sweep, a reuse sweep and a rollout-n sweep
    share one study without paying for the whole cross product.
    """

    name: str = "study"
    models: list[str] = field(default_factory=list)
    rollout_n: list[int] = field(default_factory=list)  # empty: [grpo.rollout_n]
    reuse_factor: list[int] = field(default_factory=list)  # empty: [grpo.reuse_factor]
    family: list[str] = field(default_factory=lambda: ["base"])
    seeds: list[int] = field(default_factory=list)  # empty: [grpo.seed]
    sweeps: list[SweepConfig] = field(default_factory=list)
    max_concurrent: int = 1
    scheduler: bool = True
    scheduler_grace_fraction: float = 0.25
    x: Literal["compute", "data"] = "compute"
    # Experiment trackers that get every step and evaluation row, with the trial's config as
    # parameters, through Ray Tune's logger callbacks (rayrl/study/trackers.py).
    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = field(
        default_factory=lambda: ["tensorboard"]
    )
    # MLflow's tracking URI; empty: a local file store in the study directory (mlflow/).
    mlflow_tracking_uri: str = ""
    # Any config key as an axis: dotted key -> a list (a grid) or one sampler, e.g.
    # {loguniform: [5.0e-5, 5.0e-4]} (rayrl/search.py). Each variant runs every trial of the
    # axes above, so each has its own laws.
    search: dict[str, Any] = field(default_factory=dict)
    num_samples: int = 1  # draws of the sampled keys, each crossed with the grid
    search_seed: int = 0  # the draws' seed: a resumed study draws the same variants


@dataclass
class RewardsConfig:
    """Your own verifiers, ahead of rayrl's (rayrl/rewards/custom.py)."""

    # data_source glob -> fn(response, ground_truth, row) -> float, written
    # "package.module:function" or "path/to/file.py:function" (relative to this file's folder),
    # e.g. {"mytask*": "my_rewards.py:score"}. The first glob that matches a row wins; rows
    # that none matches keep rayrl's verifiers. Each call runs in a killable worker process
    # under the reward pool's per-call timeout, as rayrl's verifiers do.
    custom: dict[str, str] = field(default_factory=dict)
    # A call that raises or times out scores 0 and is logged with its row's index; when more
    # than this share of one function's calls in a batch fail, the run stops with its error.
    max_failure_share: float = 0.1


@dataclass
class Config:
    ladder: LadderConfig = field(default_factory=LadderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    output_dir: str = "runs"
    source: str = field(default="", metadata={"internal": True})  # the YAML file, for errors

    def trials(self) -> list[Trial]:
        """Every distinct trial of the study, with the sweeps it belongs to, grouped by model:
        each sweep's axes crossed with each variant of its search space."""
        st = self.study
        sweeps: dict[tuple, list[str]] = {}
        for sw in st.sweeps or [SweepConfig(name="grid")]:
            for overrides in variants({**st.search, **sw.search}, st.num_samples, st.search_seed):
                g = self.with_overrides(overrides).grpo  # a searched grpo.seed fills seeds
                defaults = {
                    "rollout_n": [g.rollout_n],
                    "reuse_factor": [g.reuse_factor],
                    "seeds": [g.seed],
                }
                axes = [getattr(sw, a) or getattr(st, a) or defaults.get(a, []) for a in SWEEP_AXES]
                for values in itertools.product(*axes):
                    key = (*values, tuple(overrides.items()))
                    sweeps.setdefault(key, []).append(sw.name)
        out = [
            Trial(*key[:-1], sweeps=tuple(names), overrides=key[-1])
            for key, names in sweeps.items()
        ]
        # A model's trials run back to back, in order of first appearance: each switch of
        # model rebuilds the vLLM engines.
        first: dict[tuple[str, str], int] = {}
        for t in out:
            first.setdefault((t.model, t.family), len(first))
        return sorted(out, key=lambda t: first[(t.model, t.family)])

    def with_overrides(self, overrides: dict[str, Any]) -> Config:
        """This config with dotted-key overrides (a variant's), checked as a file would be;
        the copy has no search of its own."""
        if not overrides:
            return self
        raw = dataclasses.asdict(self)
        raw.pop("source")
        raw["study"]["search"] = {}
        for sw in raw["study"]["sweeps"]:
            sw["search"] = {}
        where = self.source or "<config>"
        set_keys(raw, overrides, where)
        cfg = from_dict(Config, raw, where, "")
        cfg.source = where
        validate(cfg)
        return cfg

    def resources_for(self, model: str, family: str | None = None) -> ResourcesConfig:
        """The pools one run of `model` gets: `resources` with the model's own overrides
        (a model given by path, not listed under ladder.models, gets `resources`)."""
        for spec in self.ladder.models:
            if spec.name == model and family in (None, spec.family):
                return dataclasses.replace(self.resources, **spec.resources)
        return self.resources

    def model(self, name: str, family: str | None = None) -> ModelSpec:
        for spec in self.ladder.models:
            if spec.name == name and family in (None, spec.family):
                return spec
        known = ", ".join(f"{m.name} ({m.family})" for m in self.ladder.models) or "none"
        raise ConfigError(
            f"{self.source or '<config>'}: no model named {name!r}"
            f"{f' in family {family!r}' if family else ''} under ladder.models (known: {known})"
        )


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Read a YAML config, apply dotted-key overrides, and validate it."""
    path = Path(path)
    where = str(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{where}: file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level, got {type(raw).__name__}")
    set_keys(raw, overrides or {}, where)
    cfg = from_dict(Config, raw, where, "")
    cfg.source = where
    resolve_paths(cfg, path.parent)
    validate(cfg)
    return cfg


_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def resolve_paths(cfg: Config, base: Path) -> None:
    """Make the config's input paths independent of the working directory: in data.train_path,
    data.test_path, data.eval_paths, ladder.models[].path and rewards.custom's files,
    ${VAR} and ${VAR:-default} (e.g. ${RAYRL_GURU_DIR:-/mnt/rayrl/data/guru}) and ~ are
    expanded, and a relative path is made absolute: from `base`, the config file's folder,
    when it names a file or folder there, else from the working directory when it names one
    there (a --set value). Anything else is kept: a hub id, a `datasets` name,
    package:file.gguf; a reward file that is nowhere is looked for beside the config."""
    from rayrl.rewards.custom import is_file_ref

    where = cfg.source or "<config>"

    def resolve(value: str, key: str) -> str:
        def var(m: re.Match) -> str:
            if m.group(1) in os.environ:
                return os.environ[m.group(1)]
            if m.group(2) is None:
                raise ConfigError(
                    f"{where}: key '{key}' names ${{{m.group(1)}}}, which is not set "
                    f"(set it, or write ${{{m.group(1)}:-default}})"
                )
            return m.group(2)

        value = _VAR.sub(var, value)
        path = Path(value).expanduser()
        for root in (base, Path.cwd()) if value and not path.is_absolute() else ():
            if (root / path).exists():
                return str((root / path).resolve())
        return str(path) if value.startswith("~") else value

    d = cfg.data
    d.train_path = resolve(d.train_path, "data.train_path")
    d.test_path = resolve(d.test_path, "data.test_path")
    d.eval_paths = [resolve(p, f"data.eval_paths[{i}]") for i, p in enumerate(d.eval_paths)]
    for i, m in enumerate(cfg.ladder.models):
        m.path = resolve(m.path, f"ladder.models[{i}].path")
    for glob, ref in cfg.rewards.custom.items():
        if isinstance(ref, str) and is_file_ref(ref):  # path/to/file.py:function
            target, _, name = ref.rpartition(":")
            target = resolve(target, f'rewards.custom["{glob}"]')
            cfg.rewards.custom[glob] = f"{(base / target).resolve()}:{name}"  # base / abs = abs


def set_keys(raw: dict[str, Any], overrides: dict[str, Any], where: str) -> None:
    """Set dotted keys in a raw config mapping (e.g. grpo.lr), in place."""
    for key, value in overrides.items():
        node = raw
        *parents, leaf = key.split(".")
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                at = ".".join(parents[: i + 1])
                raise ConfigError(
                    f"{where}: override '{key}': key '{at}' holds {node!r}, not a mapping of keys"
                )
        node[leaf] = value


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write `cfg` as YAML that load_config reads back to an equal config."""
    raw = dataclasses.asdict(cfg)
    raw.pop("source")
    Path(path).write_text(yaml.safe_dump(raw, sort_keys=False))


def from_dict(cls: type, raw: Any, where: str, prefix: str) -> Any:
    """Build dataclass `cls` from `raw`, rejecting unknown keys and wrong types."""
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{where}: key '{prefix.rstrip('.') or '<top>'}' expected a mapping, got {raw!r}"
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(f"{where}: unknown key '{key}' (expected one of: {', '.join(fields)})")
    kwargs = {name: _coerce(hints[name], raw[name], where, f"{prefix}{name}") for name in raw}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where, key + ".")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: key '{key}' expected a list, got {value!r}")
        return [_coerce(item, v, where, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"{where}: key '{key}' expected one of {list(choices)}, got {value!r}"
            )
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: key '{key}' expected a mapping, got {value!r}")
        return dict(value)
    if origin in (typing.Union, types.UnionType):
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML reads 1e-6 as a string
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: key '{key}' expected {tp.__name__}, got {value!r}")
    return value


# grpo keys whose values the study's axes set: searched only where that axis is not swept.
AXIS_KEYS = {
    "grpo.rollout_n": "rollout_n",
    "grpo.reuse_factor": "reuse_factor",
    "grpo.seed": "seeds",
}


def check_search(cfg: Config) -> None:
    """Every searched key is a run's config key, every sampler well-formed, and every value or
    end of a range one the config's own validation accepts."""
    where, st = cfg.source or "<config>", cfg.study
    if st.num_samples < 1:
        raise ConfigError(
            f"{where}: key 'study.num_samples' expected an integer >= 1, got {st.num_samples!r}"
        )
    spaces = [("study.search", st.search, [st])]
    spaces += [(f"study.sweeps[{i}].search", sw.search, [st, sw]) for i, sw in enumerate(st.sweeps)]
    for prefix, search, grids in spaces:
        for key, spec in search.items():
            name = f"{prefix}.{key}"
            if key.split(".")[0] in ("study", "output_dir"):
                raise ConfigError(
                    f"{where}: key '{name}' expected a run's config key (grpo., data., "
                    "resources., ladder.), not the study's own"
                )
            axis = AXIS_KEYS.get(key)
            if axis and any(getattr(grid, axis) for grid in grids):
                raise ConfigError(
                    f"{where}: key '{name}' is already an axis of the study (study.{axis}); "
                    "list its values there"
                )
            try:
                values = points(key, spec)
            except SearchError as e:
                raise ConfigError(f"{where}: {prefix}: {e}") from None
            for value in values:
                try:
                    cfg.with_overrides({key: value})
                except ConfigError as e:
                    why = str(e).removeprefix(f"{where}: ")
                    raise ConfigError(
                        f"{where}: key '{name}': the value {value!r} is refused ({why})"
                    ) from None
    for sw in st.sweeps or [SweepConfig(name="grid")]:
        labels = [
            label(v) for v in variants({**st.search, **sw.search}, st.num_samples, st.search_seed)
        ]
        if len(labels) != len(set(labels)):
            raise ConfigError(
                f"{where}: key 'study.search' draws variants that share a name at 4 digits "
                f"({sorted(labels)}); change study.search_seed or the ranges"
            )


class _Need:
    """need(ok, key, expected, got): raise the config's error for a key that fails a check."""

    def __init__(self, where: str) -> None:
        self.where = where

    def __call__(self, ok: bool, key: str, expected: str, got: Any) -> None:
        if not ok:
            raise ConfigError(f"{self.where}: key '{key}' expected {expected}, got {got!r}")


def _check_grpo(g: GRPOConfig, need: _Need) -> None:
    """GRPO's values: ranges, and how the budget, batch and reuse factor divide."""
    need(g.rollout_n >= 2, "grpo.rollout_n", "at least 2 (GRPO needs a group)", g.rollout_n)
    need(0 <= g.clip_low < 1, "grpo.clip_low", "a value in [0, 1)", g.clip_low)
    need(g.clip_high >= 0, "grpo.clip_high", "a non-negative value", g.clip_high)
    need(g.kl_coef >= 0, "grpo.kl_coef", "a non-negative value", g.kl_coef)
    need(g.lr > 0, "grpo.lr", "a positive learning rate", g.lr)
    need(g.temperature > 0, "grpo.temperature", "a positive temperature", g.temperature)
    need(
        g.eval_temperature > 0,
        "grpo.eval_temperature",
        "a positive temperature",
        g.eval_temperature,
    )
    for name in (
        "prompts_per_step",
        "max_new_tokens",
        "max_prompt_tokens",
        "micro_batch",
        "mini_batches",
        "ppo_epochs",
        "data_budget",
        "eval_every",
        "eval_samples",
        "checkpoint_every",
        "checkpoint_keep",
    ):
        need(getattr(g, name) > 0, f"grpo.{name}", "a positive integer", getattr(g, name))
    need(g.clip_ratio_c > 1, "grpo.clip_ratio_c", "a value above 1", g.clip_ratio_c)
    need(g.async_steps in (0, 1), "grpo.async_steps", "0 or 1", g.async_steps)
    need(
        g.micro_batch_tokens >= 0,
        "grpo.micro_batch_tokens",
        "0 (micro_batch samples) or a token budget",
        g.micro_batch_tokens,
    )
    need(g.is_cap >= 1, "grpo.is_cap", "a cap of at least 1", g.is_cap)
    need(0 <= g.gspo_clip_low < 1, "grpo.gspo_clip_low", "a value in [0, 1)", g.gspo_clip_low)
    need(g.gspo_clip_high >= 0, "grpo.gspo_clip_high", "a non-negative value", g.gspo_clip_high)
    need(g.cispo_clip_high >= 0, "grpo.cispo_clip_high", "a non-negative value", g.cispo_clip_high)
    need(g.max_gen_rounds >= 1, "grpo.max_gen_rounds", "an integer >= 1", g.max_gen_rounds)
    need(
        g.overlong_buffer >= 0, "grpo.overlong_buffer", "a non-negative integer", g.overlong_buffer
    )
    if g.overlong == "penalty":
        need(
            1 <= g.overlong_buffer <= g.max_new_tokens,
            "grpo.overlong_buffer",
            f"1 to grpo.max_new_tokens={g.max_new_tokens} tokens with grpo.overlong: penalty",
            g.overlong_buffer,
        )
    need(
        bool(g.pass_k)
        and all(1 <= k <= g.eval_samples for k in g.pass_k)
        and len(set(g.pass_k)) == len(g.pass_k),
        "grpo.pass_k",
        f"distinct integers from 1 to grpo.eval_samples={g.eval_samples} (pass@k needs k draws)",
        g.pass_k,
    )
    need(
        g.prompts_per_step % g.mini_batches == 0,
        "grpo.mini_batches",
        f"a divisor of grpo.prompts_per_step={g.prompts_per_step}",
        g.mini_batches,
    )
    need(g.reuse_factor >= 1, "grpo.reuse_factor", "an integer >= 1", g.reuse_factor)
    need(
        g.data_budget >= g.prompts_per_step,
        "grpo.data_budget",
        f"at least grpo.prompts_per_step={g.prompts_per_step} samples (one step; "
        f"a run has data_budget // prompts_per_step steps)",
        g.data_budget,
    )
    need(
        g.data_budget % g.reuse_factor == 0,
        "grpo.reuse_factor",
        f"a divisor of grpo.data_budget={g.data_budget}",
        g.reuse_factor,
    )


def _check_resources(r: ResourcesConfig, prefix: str, need: _Need) -> None:
    """One set of pools: the study-wide one or a model's."""
    for name in ("rollout_workers", "tensor_parallel", "learners", "reward_workers"):
        need(getattr(r, name) >= 1, f"{prefix}.{name}", "an integer >= 1", getattr(r, name))
    need(r.zero_stage in (0, 1, 2, 3), f"{prefix}.zero_stage", "0, 1, 2 or 3", r.zero_stage)
    need(r.cpus_per_actor > 0, f"{prefix}.cpus_per_actor", "a positive number", r.cpus_per_actor)
    need(
        r.vllm_kv_cache_gib > 0,
        f"{prefix}.vllm_kv_cache_gib",
        "a positive size",
        r.vllm_kv_cache_gib,
    )
    need(r.gpu_memory_gib > 0, f"{prefix}.gpu_memory_gib", "a positive size", r.gpu_memory_gib)
    if r.device == "cpu":
        need(r.tensor_parallel == 1, f"{prefix}.tensor_parallel", "1 on cpu", r.tensor_parallel)


def _check_pools(cfg: Config, need: _Need) -> None:
    """The study-wide pools and each model's own overrides of them."""
    _check_resources(cfg.resources, "resources", need)
    hints = typing.get_type_hints(ResourcesConfig)
    for i, m in enumerate(cfg.ladder.models):
        prefix = f"ladder.models[{i}].resources"
        for name, value in m.resources.items():
            need(
                name in hints and name != "device",
                f"{prefix}.{name}",
                f"one of {[k for k in hints if k != 'device']} (device is study-wide)",
                name,
            )
            m.resources[name] = _coerce(hints[name], value, need.where, f"{prefix}.{name}")
        _check_resources(cfg.resources_for(m.name, m.family), prefix, need)


def _check_data(d: DataConfig, need: _Need) -> None:
    """Where prompts come from, and how many."""
    need(d.test_size > 0, "data.test_size", "a positive integer", d.test_size)
    need(d.train_size > 0, "data.train_size", "a positive integer", d.train_size)
    need(d.eval_size > 0, "data.eval_size", "a positive integer", d.eval_size)
    need(d.max_digits >= 1, "data.max_digits", "an integer >= 1", d.max_digits)
    if d.source == "guru":
        need(bool(d.train_path), "data.train_path", "a parquet path or dataset name", d.train_path)
        need(bool(d.test_path), "data.test_path", "a parquet path or dataset name", d.test_path)


def _check_ladder(cfg: Config, need: _Need) -> None:
    """The ladder's models (shapes vLLM CPU can serve) and their pre-training."""
    names = [(m.name, m.family) for m in cfg.ladder.models]
    need(len(names) == len(set(names)), "ladder.models", "unique (name, family) pairs", names)
    for i, m in enumerate(cfg.ladder.models):
        if m.path:  # an existing model; its directory is checked where the run starts
            continue
        for name in ("hidden", "layers", "heads", "kv_heads"):
            need(
                getattr(m, name) > 0,
                f"ladder.models[{i}].{name}",
                "a positive integer",
                getattr(m, name),
            )
        need(
            m.instruct_steps >= 0,
            f"ladder.models[{i}].instruct_steps",
            "0 or a positive integer",
            m.instruct_steps,
        )
        need(
            m.intermediate >= 0,
            f"ladder.models[{i}].intermediate",
            "0 or a positive integer",
            m.intermediate,
        )
        need(
            m.hidden % m.heads == 0,
            f"ladder.models[{i}].heads",
            f"a divisor of hidden={m.hidden}",
            m.heads,
        )
        need(
            m.heads % m.kv_heads == 0,
            f"ladder.models[{i}].kv_heads",
            f"a divisor of heads={m.heads}",
            m.kv_heads,
        )
    lad = cfg.ladder
    need(
        lad.pretrain_tokens_per_param >= 0,
        "ladder.pretrain_tokens_per_param",
        "a non-negative number",
        lad.pretrain_tokens_per_param,
    )
    for name in (
        "pretrain_min_steps",
        "pretrain_batch",
        "pretrain_lr_width",
        "eval_problems",
        "eval_samples",
    ):
        need(getattr(lad, name) > 0, f"ladder.{name}", "a positive integer", getattr(lad, name))
    need(lad.pretrain_lr > 0, "ladder.pretrain_lr", "a positive learning rate", lad.pretrain_lr)
    for name in ("pretrain_hardest_share", "pretrain_unboxed_share"):
        need(
            0 <= getattr(lad, name) <= 1, f"ladder.{name}", "a share in [0, 1]", getattr(lad, name)
        )
    # vLLM's CPU attention kernels exist for these head sizes only.
    if cfg.resources.device == "cpu":
        for i, m in enumerate(lad.models):
            if not m.path and m.heads > 0 and m.hidden % m.heads == 0:
                need(
                    m.hidden // m.heads in CPU_HEAD_DIMS,
                    f"ladder.models[{i}].heads",
                    f"hidden/heads in {list(CPU_HEAD_DIMS)} (vLLM CPU attention)",
                    m.heads,
                )


def _check_rewards(rw: RewardsConfig, need: _Need) -> None:
    """The reward functions of the user's own, imported now so a typo fails early."""
    need(
        0 <= rw.max_failure_share <= 1,
        "rewards.max_failure_share",
        "a share in [0, 1]",
        rw.max_failure_share,
    )
    if rw.custom:  # imported now, so that a typo fails before any actor starts
        from rayrl.rewards.custom import FORMS, problem

        for glob, ref in rw.custom.items():
            why = problem(ref)
            need(
                why is None,
                f'rewards.custom["{glob}"]',
                f"{FORMS} naming a function fn(response, ground_truth, row) -> float ({why})",
                ref,
            )


def _check_study(cfg: Config, need: _Need) -> None:
    """The study's axes, sweeps, trackers and scheduling."""
    g = cfg.grpo
    check_search(cfg)
    trials = cfg.trials()
    names = [(m.name, m.family) for m in cfg.ladder.models]
    grids = [cfg.study, *cfg.study.sweeps]
    for tau in sorted({tau for grid in grids for tau in grid.reuse_factor}):
        need(
            tau >= 1 and g.data_budget % tau == 0,
            "study.reuse_factor",
            f"divisors of grpo.data_budget={g.data_budget}",
            tau,
        )
    for n in sorted({n for grid in grids for n in grid.rollout_n}):
        need(n >= 2, "study.rollout_n", "group sizes of at least 2", n)

    for t in trials:
        need(
            (t.model, t.family) in names,
            "study.models",
            f"names of ladder.models entries with family {t.family!r} "
            f"(known: {', '.join(f'{n} ({f})' for n, f in names)})",
            t.model,
        )
    need(
        len(set(cfg.study.trackers)) == len(cfg.study.trackers),
        "study.trackers",
        "each tracker once",
        cfg.study.trackers,
    )
    sweep_names = [sw.name for sw in cfg.study.sweeps]
    need(
        len(sweep_names) == len(set(sweep_names)), "study.sweeps", "unique sweep names", sweep_names
    )
    need(
        cfg.study.max_concurrent >= 1,
        "study.max_concurrent",
        "an integer >= 1",
        cfg.study.max_concurrent,
    )
    need(
        0 < cfg.study.scheduler_grace_fraction < 1,
        "study.scheduler_grace_fraction",
        "a value in (0, 1)",
        cfg.study.scheduler_grace_fraction,
    )


def validate(cfg: Config) -> None:
    """Check values that are well-typed but impossible, section by section."""
    need = _Need(cfg.source or "<config>")
    _check_grpo(cfg.grpo, need)
    _check_pools(cfg, need)
    _check_data(cfg.data, need)
    _check_ladder(cfg, need)
    _check_rewards(cfg.rewards, need)
    _check_study(cfg, need)
