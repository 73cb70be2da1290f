"""The deployable cluster configurations under cluster/ (fast, offline, no cloud or Kubernetes needed).

* cluster/aws.yaml is checked the way `ray up` checks it: Ray's own ``prepare_config`` +
  ``validate_config`` (jsonschema against ``ray/autoscaler/ray-schema.json`` of the installed Ray),
  and the raw file against the same schema. Broken copies must fail, so the check can fail.
* The KubeRay manifests are parsed and their required structure asserted (there is no KubeRay CRD
  schema offline).
* Every example command ``python jobs/<job>.py ...`` in cluster/ (RayJob entrypoint, comments,
  README) must name an existing job whose argparse parser accepts the arguments.
* Image tags / rayVersion / pyproject pins all say the same Ray version.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import re
import shlex
import sys
from pathlib import Path
from unittest import mock

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
AWS_YAML = CLUSTER / "aws.yaml"
KUBERAY = CLUSTER / "kuberay"
RAYCLUSTER_YAML = KUBERAY / "raycluster.yaml"
RAYJOB_YAML = KUBERAY / "rayjob-nightly-score.yaml"
CRONJOB_YAML = KUBERAY / "cronjob-nightly.yaml"
PREREQ_YAML = KUBERAY / "prerequisites.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"
README = CLUSTER / "README.md"

RAY_VERSION = "2.60.0"
NAMESPACE = "cxr"
AUTH_SECRET = "cxr-ray-auth"
AUTH_SECRET_KEY = "auth_token"  # KubeRay's key for the token inside the Secret
RAY_SA = "cxr-ray"
GPU = "nvidia.com/gpu"


def load_yaml(path: Path):
    with open(path) as f:
        return yaml.safe_load(f)


def load_all(path: Path) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected exactly one {kind}, got {len(found)}"
    return found[0]


def pyproject() -> dict:
    import tomllib

    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


# =========================================================================== AWS cluster launcher


def ray_schema() -> dict:
    import ray.autoscaler

    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as f:
        return json.load(f)


def launcher_validate(config: dict) -> dict:
    """What `ray up` does before touching AWS (commands._bootstrap_config): fill in the provider
    defaults, then jsonschema-validate. Resource auto-detection (an EC2 API call) is skipped; the
    config declares its resources."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def aws() -> dict:
    return load_yaml(AWS_YAML)


def test_installed_ray_is_the_pinned_version():
    import ray

    # The schema the AWS config is validated against is the one of this Ray.
    assert ray.__version__ == RAY_VERSION


def test_aws_yaml_validates_against_rays_schema(aws):
    jsonschema.validate(aws, ray_schema())  # the file as written
    prepared = launcher_validate(aws)  # the file as `ray up` sees it, defaults merged
    assert prepared["provider"]["region"] == "us-east-1"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def _unknown_top_level_key(c):
    c["dashboard_port"] = 8265


def _max_workers_wrong_type(c):
    c["max_workers"] = "eight"


def _gpu_resources_wrong_type(c):
    c["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "1"


def _node_type_without_resources(c):
    del c["available_node_types"]["gpu_worker"]["resources"]


def _command_not_a_string(c):
    c["head_start_ray_commands"].append(["ray", "start"])


@pytest.mark.parametrize(
    "breakage",
    [
        _unknown_top_level_key,
        _max_workers_wrong_type,
        _gpu_resources_wrong_type,
        _node_type_without_resources,
        _command_not_a_string,
    ],
)
def test_broken_aws_yaml_is_rejected(aws, breakage):
    broken = copy.deepcopy(aws)
    breakage(broken)
    with pytest.raises(jsonschema.ValidationError):
        launcher_validate(broken)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, ray_schema())


def aws_gpu_types(aws) -> dict:
    types = aws["available_node_types"]
    return {n: t for n, t in types.items() if t["resources"].get("GPU", 0) > 0}


def test_aws_gpu_group_scales_from_zero(aws):
    gpu = aws_gpu_types(aws)
    assert list(gpu) == ["gpu_worker"]
    group = gpu["gpu_worker"]
    assert group["min_workers"] == 0
    assert group["max_workers"] >= 1
    # Declared resources are what lets the autoscaler launch the first GPU node.
    assert group["resources"]["GPU"] >= 1 and group["resources"]["CPU"] >= 1
    assert group["node_config"]["InstanceType"].startswith("g5.")


def test_aws_head_is_cpu_only_and_workers_autoscale(aws):
    types = aws["available_node_types"]
    head = types[aws["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"]["CPU"] > 0  # runs drivers and decode tasks
    assert head["node_config"]["InstanceType"].startswith("m6i.")
    workers = {n: t for n, t in types.items() if n != aws["head_node_type"]}
    assert {"cpu_worker", "gpu_worker"} <= set(workers)
    for name, t in workers.items():
        assert t["min_workers"] == 0, name
        assert 1 <= t["max_workers"] <= aws["max_workers"], name
    assert aws["idle_timeout_minutes"] > 0
    # The AMI is a placeholder users must replace, identical on every node type.
    amis = {t["node_config"]["ImageId"] for t in types.values()}
    assert amis == {"ami-REPLACE-WITH-DLAMI-ID"}


def ray_start_commands(aws) -> list[str]:
    cmds = [c for c in aws["head_start_ray_commands"] + aws["worker_start_ray_commands"] if "ray start" in c]
    assert len(cmds) == 2
    return cmds


def test_aws_dashboard_only_on_localhost(aws):
    for cmd in ray_start_commands(aws):
        assert "--dashboard-host=127.0.0.1" in cmd, cmd
        assert "0.0.0.0" not in cmd, cmd
    assert "--head" in aws["head_start_ray_commands"][-1]


def test_aws_token_auth_on_every_node(aws):
    for cmd in ray_start_commands(aws):
        assert "RAY_AUTH_MODE=token" in cmd, cmd
    # The token file Ray reads by default (~/.ray/auth_token) is copied to every node.
    assert aws["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_aws_installs_the_project_from_its_pyproject(aws):
    mounts = aws["file_mounts"]
    for remote, local in mounts.items():
        if remote.startswith("~/cxr/"):
            # Local paths are relative to the repository root (where `ray up` is run).
            assert (ROOT / local).exists(), local
    assert mounts["~/cxr/pyproject.toml"] == "pyproject.toml"
    assert mounts["~/cxr/lib"] == "lib" and mounts["~/cxr/jobs"] == "jobs"
    setup = " && ".join(aws["setup_commands"])
    assert "cd ~/cxr && ~/cxr-venv/bin/pip install -e ." in setup
    assert "python3.11 -m venv" in setup  # pyproject: requires-python >=3.11,<3.12
    # The launcher's default setup commands (a different Ray wheel) must be replaced.
    assert aws["head_setup_commands"] == [] and aws["worker_setup_commands"] == []
    assert "ray-wheels" not in AWS_YAML.read_text()


def test_every_installer_uses_the_constraints_file(aws):
    """scripts/setup.sh, cluster/Dockerfile and aws.yaml install from constraints.txt, which pins every dependency
    of pyproject.toml (and the offline-weights group) at a version its range allows."""
    from packaging.requirements import Requirement

    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    project = pyproject()
    wanted = [*project["project"]["dependencies"], *project["project"]["optional-dependencies"]["test"]]
    wanted += project["dependency-groups"]["offline"]
    for text in wanted:
        req = Requirement(text)
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), (text, pins[name])
    assert "cxr" not in pins  # the project itself is not a constraint

    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "-c constraints.txt -e '.[test]'" in setup
    assert "--no-deps -c constraints.txt --group offline" in setup
    assert re.search(r"^RUN pip install .*-c constraints\.txt \.", DOCKERFILE.read_text(), re.M)
    assert "constraints.txt" in re.search(r"^COPY .*constraints\.txt", DOCKERFILE.read_text(), re.M).group(0)
    assert aws["file_mounts"]["~/cxr/constraints.txt"] == "constraints.txt"
    assert "cd ~/cxr && ~/cxr-venv/bin/pip install -e . -c constraints.txt" in aws["setup_commands"]


# =========================================================================== KubeRay manifests


@pytest.fixture(scope="module")
def raycluster() -> dict:
    docs = load_all(RAYCLUSTER_YAML)
    assert len(docs) == 1
    return docs[0]


@pytest.fixture(scope="module")
def rayjob() -> dict:
    docs = load_all(RAYJOB_YAML)
    assert len(docs) == 1
    return docs[0]


@pytest.fixture(scope="module")
def cron_docs() -> list[dict]:
    return load_all(CRONJOB_YAML)


def test_every_manifest_parses_with_the_right_api_version_and_kind():
    expected = {
        RAYCLUSTER_YAML: [("ray.io/v1", "RayCluster")],
        RAYJOB_YAML: [("ray.io/v1", "RayJob")],
        CRONJOB_YAML: [
            ("v1", "ServiceAccount"),
            ("rbac.authorization.k8s.io/v1", "Role"),
            ("rbac.authorization.k8s.io/v1", "RoleBinding"),
            ("batch/v1", "CronJob"),
        ],
        PREREQ_YAML: [("v1", "Namespace"), ("v1", "ServiceAccount")],
    }
    assert set(KUBERAY.glob("*.yaml")) == set(expected), "new manifest: add it to this test"
    for path, kinds in expected.items():
        docs = load_all(path)
        assert [(d["apiVersion"], d["kind"]) for d in docs] == kinds, path.name
        for d in docs:
            if d["kind"] != "Namespace":
                assert d["metadata"]["namespace"] == NAMESPACE, (path.name, d["kind"])


def containers_of(template: dict) -> list[dict]:
    containers = template["spec"]["containers"]
    assert containers, "pod template without containers"
    return containers


def assert_token_env(env: list[dict], where: str) -> None:
    by_name = {e["name"]: e for e in env}
    assert by_name.get("RAY_AUTH_MODE", {}).get("value") == "token", where
    token = by_name.get("RAY_AUTH_TOKEN")
    assert token is not None, f"{where}: RAY_AUTH_TOKEN missing"
    assert "value" not in token, f"{where}: literal token in a manifest"
    assert token["valueFrom"]["secretKeyRef"] == {"name": AUTH_SECRET, "key": AUTH_SECRET_KEY}, where


def assert_requests_and_limits(container: dict, where: str) -> None:
    res = container.get("resources", {})
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(res.get(kind, {})), f"{where}: resources.{kind} needs cpu and memory"


def check_ray_cluster_spec(spec: dict, where: str) -> None:
    assert spec["rayVersion"] == RAY_VERSION, where
    assert spec["enableInTreeAutoscaling"] is True, where
    autoscaler = spec["autoscalerOptions"]
    assert isinstance(autoscaler["idleTimeoutSeconds"], int) and autoscaler["idleTimeoutSeconds"] > 0, where
    assert_token_env(autoscaler["env"], f"{where} autoscaler")

    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP", f"{where}: the head service must not be exposed"
    assert "headService" not in head, where
    assert isinstance(head["rayStartParams"], dict), where
    templates = [("head", head)]

    groups = spec["workerGroupSpecs"]
    assert {g["groupName"] for g in groups} == {"cpu", "gpu"}, where
    for g in groups:
        name = f"{where} worker group {g['groupName']}"
        assert isinstance(g["minReplicas"], int) and isinstance(g["maxReplicas"], int), name
        assert 0 <= g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"], name
        assert g["maxReplicas"] >= 1, name
        assert isinstance(g["rayStartParams"], dict), name
        templates.append((name, g))

    for name, group in templates:
        # KubeRay's rayStartParams is map[string]string: a YAML number or bool is rejected.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), name
        pod = group["template"]
        assert pod["spec"]["serviceAccountName"] == RAY_SA, name
        ray_container = containers_of(pod)[0]  # KubeRay treats the first container as Ray's
        assert_requests_and_limits(ray_container, name)
        assert_token_env(ray_container["env"], name)

    gpu_groups = [g for g in groups if GPU in containers_of(g["template"])[0]["resources"]["limits"]]
    assert [g["groupName"] for g in gpu_groups] == ["gpu"], where
    gpu = gpu_groups[0]
    assert gpu["minReplicas"] == 0, f"{where}: GPU group must scale from zero"
    res = containers_of(gpu["template"])[0]["resources"]
    assert int(res["limits"][GPU]) >= 1, where
    assert res["requests"].get(GPU, res["limits"][GPU]) == res["limits"][GPU], where  # K8s: must be equal
    tolerations = gpu["template"]["spec"]["tolerations"]
    assert any(t.get("key") == GPU and t.get("effect") == "NoSchedule" for t in tolerations), where
    # Nothing else asks for GPUs.
    for g in [head, *groups]:
        if g is not gpu:
            assert GPU not in json.dumps(g), where


def test_raycluster_structure(raycluster):
    assert raycluster["metadata"]["name"] == "cxr"
    check_ray_cluster_spec(raycluster["spec"], "RayCluster")


def test_rayjob_structure(rayjob):
    spec = rayjob["spec"]
    check_ray_cluster_spec(spec["rayClusterSpec"], "RayJob.rayClusterSpec")
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert spec["submissionMode"] == "K8sJobMode"
    assert isinstance(spec["activeDeadlineSeconds"], int) and spec["activeDeadlineSeconds"] > 0
    # The operator must know the token too (job status polling, submitter pod).
    assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token", "secretName": AUTH_SECRET}
    # Created nightly with `kubectl create` from the same file: a fixed name would collide.
    assert "name" not in rayjob["metadata"] and rayjob["metadata"]["generateName"].endswith("-")


def test_rayjob_and_raycluster_describe_the_same_cluster(raycluster, rayjob):
    standalone = copy.deepcopy(raycluster["spec"])
    nightly = copy.deepcopy(rayjob["spec"]["rayClusterSpec"])
    nightly.pop("authOptions")
    assert nightly == standalone


def test_aws_credentials_come_from_irsa_not_keys():
    sa = one(load_all(PREREQ_YAML), "ServiceAccount")
    assert sa["metadata"]["name"] == RAY_SA
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    for path in CLUSTER.rglob("*"):
        if path.is_file():
            text = path.read_text()
            for needle in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "aws_secret_access_key", "AKIA"):
                assert needle not in text, (path.name, needle)


def walk(node, path=()):
    """Yield (key path, value) for every mapping entry of a parsed YAML tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield path + (k,), v
            yield from walk(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, path + (i,))


def test_no_kubernetes_service_is_exposed():
    for path in KUBERAY.glob("*.yaml"):
        for doc in load_all(path):
            assert doc["kind"] != "Service", path.name
            assert doc["kind"] != "Ingress", path.name
            for keys, value in walk(doc):
                if keys[-1] in ("serviceType", "type") and isinstance(value, str):
                    assert value not in ("LoadBalancer", "NodePort"), (path.name, keys)
                assert not (keys[-1] in ("enableIngress", "hostNetwork") and value is True), (path.name, keys)
                assert keys[-1] != "headService", (path.name, keys)


def test_cronjob_creates_the_rayjob_with_minimal_rights(cron_docs):
    role = one(cron_docs, "Role")
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get"]}]
    sa = one(cron_docs, "ServiceAccount")["metadata"]["name"]
    binding = one(cron_docs, "RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]

    cron = one(cron_docs, "CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert len(cron["spec"]["schedule"].split()) == 5
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == sa
    (container,) = pod["containers"]
    assert "kubectl" in container["image"]
    args = container.get("command", []) + container["args"]
    assert args[-3:-1] == ["create", "-f"], args  # create (generateName), not apply
    manifest = Path(args[-1])
    mount = next(m for m in container["volumeMounts"] if manifest.parent == Path(m["mountPath"]))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    configmap = volume["configMap"]["name"]

    # The ConfigMap is generated from the RayJob file by the documented command: same name and key.
    create_cm = (
        f"kubectl -n {NAMESPACE} create configmap {configmap} "
        f"--from-file={manifest.name}={RAYJOB_YAML.relative_to(ROOT).as_posix()}"
    )
    assert create_cm in CRONJOB_YAML.read_text()
    assert create_cm in README.read_text()


# =========================================================================== job commands


JOB_COMMAND = re.compile(r"python (jobs/[\w./-]+\.py)([^\n`]*)")


def load_job(script: str):
    path = ROOT / script
    assert path.is_file(), f"{script} does not exist"
    name = "cluster_cfg_job_" + path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def shell_words(command: str) -> list[str]:
    """Split like the shell that runs it; $(...) substitutions stand for one word (a date here)."""
    return shlex.split(re.sub(r"\$\([^)]*\)", "2025-01-31", command))


def accept(script: str, args: list[str]):
    """The job's own parse_args(argv) must accept ``args``, with every option spelled out in full
    (argparse would also take an unambiguous prefix such as --gpus, which breaks as soon as a
    second option starts the same way)."""
    parsers = []
    original = argparse.ArgumentParser.parse_args

    def spy(self, *a, **kw):
        parsers.append(self)
        return original(self, *a, **kw)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", spy):
        try:
            ns = load_job(script).parse_args(args)
        except SystemExit as exc:  # argparse error
            pytest.fail(f"{script} rejects {args}: exit {exc.code}")
    known = set(parsers[-1]._option_string_actions)
    for word in args:
        if word.startswith("-"):
            assert word.split("=", 1)[0] in known, f"{script}: {word} is not one of its options"
    return ns


def test_rayjob_entrypoint_names_a_real_job_with_valid_arguments(rayjob):
    entrypoint = rayjob["spec"]["entrypoint"]
    words = shell_words(entrypoint)
    assert words[:2] == ["python", "jobs/nightly.py"]
    ns = accept(words[1], words[2:])
    assert ns.input == ["s3://YOUR_BUCKET/incoming/"]
    assert ns.table.startswith("s3://YOUR_BUCKET/") and ns.model.startswith("s3://YOUR_BUCKET/models/")


def documented_commands() -> list[tuple[str, str, str]]:
    found = []
    for path in sorted(CLUSTER.rglob("*")):
        if path.is_file() and path != RAYJOB_YAML:
            for m in JOB_COMMAND.finditer(path.read_text()):
                found.append((path.name, m.group(1), m.group(2)))
    return found


def test_documented_job_commands_are_accepted():
    commands = documented_commands()
    files = {f for f, _, _ in commands}
    assert {"aws.yaml", "README.md"} <= files  # the examples users copy
    for _where, script, args in commands:
        accept(script, shell_words(args))


def test_job_argument_check_can_fail():
    with pytest.raises(SystemExit):
        load_job("jobs/score.py").parse_args(["--output", "s3://b/o/"])  # --input is required
    with pytest.raises(SystemExit):
        load_job("jobs/score.py").parse_args(shell_words("--input a --output b --no-such-flag"))


# =========================================================================== versions


def all_ray_images() -> list[str]:
    images = []
    for spec in (load_yaml(RAYCLUSTER_YAML)["spec"], load_yaml(RAYJOB_YAML)["spec"]["rayClusterSpec"]):
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            images += [c["image"] for c in containers_of(group["template"])]
    return images


def test_images_pin_ray_consistently():
    project = pyproject()["project"]
    ray_pins = [d for d in project["dependencies"] if re.match(r"ray(\[|=|$)", d)]
    assert len(ray_pins) == 1 and ray_pins[0].endswith(f"=={RAY_VERSION}"), ray_pins
    assert project["requires-python"] == ">=3.11,<3.12"

    # The project image is built FROM the Ray image of the same version and Python.
    froms = re.findall(r"^FROM\s+(\S+)", DOCKERFILE.read_text(), re.M)
    assert froms == [f"rayproject/ray:{RAY_VERSION}-py311"]

    # Every Ray container runs that one project image, tagged with the project version.
    assert set(all_ray_images()) == {f"ghcr.io/YOUR_ORG/cxr:{project['version']}"}

    # Any other mention of a Ray image or version under cluster/ agrees.
    for path in CLUSTER.rglob("*"):
        if path.is_file():
            text = path.read_text()
            for tag in re.findall(r"rayproject/ray:([\w.\-]+)", text):
                assert tag.startswith(RAY_VERSION + "-") or tag == RAY_VERSION, (path.name, tag)
            for version in re.findall(r"rayVersion:\s*\"?([\w.]+)", text):
                assert version == RAY_VERSION, (path.name, version)
