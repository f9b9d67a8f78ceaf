"""`rayrl study CONFIG --dry-run`: memory estimates, and placement on a simulated GPU cluster.

The cluster is ray.cluster_utils.Cluster in a child process (the test session's own Ray,
tests/conftest.py, is untouched): a head with no CPUs and the worker groups of
deploy/rayjob.yaml, each pod a node whose GPUs are fake `GPU` resources. Placing a
placement group needs no CUDA, so the dry run checks the real bundles on the real shape.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rayrl.config import ConfigError, load_config
from rayrl.models.memory import (
    GIB,
    PAPER_MODELS,
    architecture,
    from_hf_config,
    kv_bytes_per_token,
    learner_gib,
    rollout_gib,
)
from rayrl.study.dryrun import estimates, format_bundles, memory_failures
from rayrl.study.tuner import trial_resources

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
RAYJOB = ROOT / "deploy" / "rayjob.yaml"

# Parameter counts on the model cards (Qwen2.5 technical report table 1; Meta's Llama 3.1/3.2
# cards), in billions: the architecture table must reproduce them.
CARD_PARAMS = {
    "Qwen2.5-0.5B": 0.49,
    "Qwen2.5-1.5B": 1.54,
    "Qwen2.5-3B": 3.09,
    "Qwen2.5-7B": 7.61,
    "Qwen2.5-14B": 14.7,
    "Qwen2.5-32B": 32.5,
    "Qwen2.5-72B": 72.7,
    "Llama-3.2-1B": 1.24,
    "Llama-3.2-3B": 3.21,
    "Llama-3.1-8B": 8.03,
    "Llama-3.1-70B": 70.6,
}


# --- the estimate ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CARD_PARAMS))
def test_architecture_table_reproduces_the_model_cards(name):
    billions = PAPER_MODELS[name].params() / 1e9
    assert billions == pytest.approx(CARD_PARAMS[name], rel=0.01), name


def test_a_model_directory_is_sized_from_its_config_json(tmp_path):
    """On the cluster the directory is there: its config.json wins over the table."""
    hf = {
        "model_type": "qwen2",
        "hidden_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 1000,
        "tie_word_embeddings": True,
    }
    model = tmp_path / "Qwen2.5-7B"  # a paper name, but the file says otherwise
    model.mkdir()
    (model / "config.json").write_text(json.dumps(hf))
    cfg = load_config(
        CONFIGS / "qwen2.5-base.yaml",
        {
            "ladder.models": [{"name": "m", "family": "qwen2.5-base", "path": str(model)}],
            "study.models": ["m"],
        },
    )
    arch = architecture(cfg, "m")
    assert arch == from_hf_config(hf) and arch.hidden == 64
    # 1000x64 tied embedding, 3 layers of q/k/v/o with q/k/v biases + MLP + 2 norms, final norm
    layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + (64 + 2 * 32) + 3 * 64 * 128 + 2 * 64
    assert arch.params() == 1000 * 64 + 3 * layer + 64


def test_an_unknown_model_without_config_json_is_an_error():
    cfg = load_config(
        CONFIGS / "qwen2.5-base.yaml",
        {
            "ladder.models": [
                {"name": "m", "family": "qwen2.5-base", "path": "/nowhere/Mystery-9B"}
            ],
            "study.models": ["m"],
        },
    )
    with pytest.raises(ConfigError, match="'m' path '/nowhere/Mystery-9B': no config.json"):
        architecture(cfg, "m")


def test_zero_stages_shard_what_the_zero_paper_says():
    cfg = load_config(CONFIGS / "qwen2.5-base.yaml")
    arch, g = PAPER_MODELS["Qwen2.5-7B"], cfg.grpo
    p = arch.params() / GIB
    n = 16

    def parts(stage):
        r = cfg.resources_for("qwen2.5-7b")
        r.learners, r.zero_stage = n, stage
        return learner_gib(arch, r, g, checkpointing=False)

    z0, z1, z2, z3 = (parts(s) for s in range(4))
    assert (z0["weights"], z0["gradients"], z0["adam"]) == pytest.approx((2 * p, 2 * p, 12 * p))
    assert (z1["gradients"], z1["adam"]) == pytest.approx((2 * p, 12 * p / n))
    assert (z2["weights"], z2["gradients"]) == pytest.approx((2 * p, 2 * p / n))
    assert (z3["weights"], z3["reference"]) == pytest.approx((2 * p / n, 2 * p / n))
    assert z0["zero_buffers"] == 0 < z2["zero_buffers"]
    # activations and logits do not shard: they grow with micro_batch x sequence length
    assert z0["activations"] == z3["activations"] > 0
    g.micro_batch *= 2
    assert parts(3)["activations"] == pytest.approx(2 * z3["activations"])
    assert parts(3)["logits"] == pytest.approx(2 * z3["logits"])


def test_checkpointing_keeps_one_hidden_state_per_layer():
    cfg = load_config(CONFIGS / "qwen2.5-base.yaml")
    arch, r, g = PAPER_MODELS["Qwen2.5-72B"], cfg.resources_for("qwen2.5-72b"), cfg.grpo
    tokens = g.micro_batch * (g.max_prompt_tokens + g.max_new_tokens)
    full = learner_gib(arch, r, g, checkpointing=False)["activations"] * GIB
    ckpt = learner_gib(arch, r, g, checkpointing=True)["activations"] * GIB
    per_layer = arch.activation_bytes_per_token()
    assert full == tokens * arch.layers * per_layer
    assert ckpt == tokens * (arch.layers * 2 * arch.hidden + per_layer)


def test_rollout_estimate_and_kv_capacity():
    cfg = load_config(CONFIGS / "llama3-instruct.yaml")
    arch, r = PAPER_MODELS["Llama-3.1-70B"], cfg.resources_for("llama3.1-70b")
    assert r.tensor_parallel == 8 == arch.kv_heads
    parts = rollout_gib(arch, r)
    assert parts["weights"] == pytest.approx(2 * arch.params() / 8 / GIB)
    assert parts["kv_cache"] == r.vllm_kv_cache_gib
    # one KV head per GPU at tp 8: K and V of 80 layers x 128 dims in bf16
    assert kv_bytes_per_token(arch, r) == 2 * 80 * 1 * 128 * 2
    r.tensor_parallel = 16  # more GPUs than KV heads: vLLM replicates, it does not split further
    assert kv_bytes_per_token(arch, r) == 2 * 80 * 1 * 128 * 2


def test_memory_failure_names_the_model_and_the_resource():
    cfg = load_config(CONFIGS / "qwen2.5-base.yaml", {"resources.gpu_memory_gib": 40})
    failures = memory_failures(cfg)
    assert any(
        f.startswith("qwen2.5-72b (qwen2.5-base): a rollout needs an estimated")
        and "resources.gpu_memory_gib = 40" in f
        for f in failures
    ), failures
    assert not any(f.startswith("qwen2.5-0.5b") for f in failures), failures


def test_cpu_studies_have_no_gpu_estimate():
    assert estimates(load_config(CONFIGS / "smoke.yaml")) == []


def test_format_bundles_groups_runs():
    text = format_bundles([{"CPU": 0.1}, {"CPU": 4, "GPU": 4}, {"CPU": 4, "GPU": 4}, {"CPU": 0.5}])
    assert text == "1 x {CPU: 0.1}, 2 x {CPU: 4, GPU: 4}, 1 x {CPU: 0.5}"


# --- the simulated cluster ------------------------------------------------------------------


def cluster_nodes() -> list[dict]:
    """Ray node arguments for each pod of deploy/rayjob.yaml's worker groups."""
    job = yaml.safe_load(RAYJOB.read_text())
    nodes = []
    for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        (c,) = g["template"]["spec"]["containers"]
        lim = c["resources"]["limits"]
        custom = json.loads(json.loads(g["rayStartParams"]["resources"]))
        node = {"num_cpus": int(lim["cpu"]), "num_gpus": int(lim["nvidia.com/gpu"])}
        nodes += [{**node, "resources": custom}] * g["replicas"]
    return nodes


def serve_cluster(nodes: list[dict]) -> None:
    """Child process: start the cluster, print its address, keep it up until stdin closes."""
    from ray.cluster_utils import Cluster

    small = {"object_store_memory": 80 * 1024**2, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, **small})
    for node in nodes:
        cluster.add_node(wait=False, **node, **small)
    cluster.wait_for_nodes()
    print(cluster.address, flush=True)
    sys.stdin.read()
    cluster.shutdown()


@pytest.fixture(scope="module")
def gpu_cluster():
    """The address of a simulated deploy/rayjob.yaml cluster (48 fake GPUs on 6 nodes)."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, __file__, json.dumps(cluster_nodes())],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        address = proc.stdout.readline().strip()
        assert address, "the simulated cluster did not start"
        yield address
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)


def dry_run(address: str, config: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": address, "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [Path(sys.executable).parent / "rayrl", "study", str(CONFIGS / config), "--dry-run"]
    t0 = time.monotonic()
    out = subprocess.run(
        [*map(str, cmd), *args], env=env, capture_output=True, text=True, timeout=300
    )
    print(f"{config} {args}: {time.monotonic() - t0:.1f} s\n{out.stdout}\n{out.stderr}")
    return out


def test_simulated_cluster_has_the_rayjob_shape():
    nodes = cluster_nodes()
    assert sum(n["num_gpus"] for n in nodes) == 48
    assert {json.dumps(n["resources"]) for n in nodes} == {'{"rollout": 8}', '{"learner": 8}'}


# Learners whose activations at micro_batch x (max_prompt_tokens + max_new_tokens) exceed an
# 80 GiB GPU unless the learner checkpoints them (the shipped grids turn it on).
TOO_BIG_WITHOUT_CHECKPOINTING = {
    "qwen2.5-base.yaml": ["qwen2.5-14b", "qwen2.5-32b", "qwen2.5-72b"],
    "qwen2.5-instruct.yaml": ["qwen2.5-14b", "qwen2.5-32b", "qwen2.5-72b"],
    "llama3-instruct.yaml": ["llama3.1-70b"],
}


@pytest.mark.parametrize("config", sorted(TOO_BIG_WITHOUT_CHECKPOINTING))
def test_dry_run_places_every_trial_of_the_shipped_grid(gpu_cluster, config):
    out = dry_run(gpu_cluster, config)
    trials = len(load_config(CONFIGS / config).trials())
    assert f"placement: {trials} of {trials} trials placed and removed" in out.stdout
    for model in load_config(CONFIGS / config).study.models:
        assert f"  {model} (" in out.stdout and "bundles 1 x {CPU: 0.1}" in out.stdout
    assert out.returncode == 0 and "dry run: every trial fits" in out.stdout, out.stderr


@pytest.mark.parametrize("config", sorted(TOO_BIG_WITHOUT_CHECKPOINTING))
def test_without_gradient_checkpointing_the_largest_learners_do_not_fit(config):
    cfg = load_config(CONFIGS / config, {"resources.gradient_checkpointing": False})
    failures = memory_failures(cfg)
    too_big = TOO_BIG_WITHOUT_CHECKPOINTING[config]
    assert len(failures) == len(too_big)
    for model, msg in zip(too_big, failures):
        assert msg.startswith(f"{model} (") and "a learner needs an estimated" in msg
        assert "set resources.gradient_checkpointing: true" in msg


@pytest.mark.parametrize(
    "config, models",
    [
        ("qwen2.5-base.yaml", "[qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-3b, qwen2.5-7b]"),
        ("llama3-instruct.yaml", "[llama3.2-1b, llama3.2-3b, llama3.1-8b]"),
    ],
)
def test_dry_run_accepts_the_grids_models_that_fit(gpu_cluster, config, models):
    out = dry_run(gpu_cluster, config, "--set", f"study.models={models}")
    assert out.returncode == 0, out.stderr
    assert "dry run: every trial fits" in out.stdout


def test_dry_run_rejects_an_oversized_trial(gpu_cluster):
    """64 learners for the 72B model (the top-level pools; 0.5B has its own): 80 GPUs, and the
    cluster has 48."""
    out = dry_run(
        gpu_cluster,
        "qwen2.5-base.yaml",
        "--set",
        "study.models=[qwen2.5-0.5b, qwen2.5-72b]",
        "--set",
        "resources.learners=64",
        "--placement-timeout",
        "3",
    )
    assert out.returncode == 2, out.stderr
    assert "qwen2.5-72b (qwen2.5-base, seed 0" in out.stderr
    assert "it needs 80 GPU, the cluster has 48" in out.stderr
    assert "placement: 3 of 6 trials placed" in out.stdout  # the three 0.5B seeds


if __name__ == "__main__":
    serve_cluster(json.loads(sys.argv[1]))


def test_pool_sizes_shape_each_trials_placement_group():
    cfg = load_config(CONFIGS / "smoke.yaml")
    base = trial_resources(cfg, "smoke-1", "base").bundles
    # driver, rollout engine, learner, reward worker (Tune drops the zero GPU counts)
    assert base == [{"CPU": 0.1}] + [{"CPU": 0.5}] * 3
    cfg = load_config(
        CONFIGS / "smoke.yaml",
        {
            "resources.rollout_workers": 2,
            "resources.learners": 3,
            "resources.reward_workers": 4,
            "resources.cpus_per_actor": 1.0,
        },
    )
    bundles = trial_resources(cfg, "smoke-1", "base").bundles
    assert bundles == [{"CPU": 0.1}] + [{"CPU": 1.0}] * 5 + [{"CPU": 0.5}] * 4


def test_vllm_dtype_sets_the_engines_weight_bytes():
    cfg = load_config(CONFIGS / "qwen2.5-base.yaml")
    arch = architecture(cfg, "qwen2.5-7b", "qwen2.5-base")
    r = cfg.resources_for("qwen2.5-7b", "qwen2.5-base")
    bf16 = rollout_gib(arch, r)["weights"]
    fp32 = rollout_gib(arch, dataclasses.replace(r, vllm_dtype="float32"))["weights"]
    assert fp32 == pytest.approx(2 * bf16)
    assert bf16 == pytest.approx(2 * arch.params() / r.tensor_parallel / GIB)
