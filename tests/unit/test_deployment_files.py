"""The deployment files in platform/ pass `python -m jobs.check_deployment` (`workflows.deployment`), and
every check catches the mistake it exists for: each test breaks one thing in a copy under tmp_path and
expects a message that names the file and the problem. Nothing here needs a cluster, Docker or the network."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from jobs import check_deployment
from workflows.deployment import base, cluster_launcher, dockerfiles, kuberay, kubernetes_schemas
from workflows.deployment.base import Context, DeploymentError

pytestmark = pytest.mark.unit

ROOT = base.REPO_ROOT
KUBERAY = ROOT / base.KUBERAY


@pytest.fixture(scope="session")
def ctx() -> Context:
    """The repository's context, built once (the CRD validators are cached per process as well)."""
    return base.load_context(ROOT)


def broken(tmp_path: Path, source: Path, old: str, new: str, count: int = 1) -> Path:
    """A copy of `source` in tmp_path with `old` replaced by `new` (which must be there)."""
    text = source.read_text()
    assert old in text, f"{old!r} is not in {source}"
    target = tmp_path / source.name
    target.write_text(text.replace(old, new, count))
    return target


def edited(tmp_path: Path, source: Path, change: Callable[[list[dict]], None]) -> Path:
    """A copy of a manifest with its parsed documents changed by `change`."""
    docs = base.load_documents(source)
    change(docs)
    target = tmp_path / source.name
    target.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return target


# ----------------------------------------------------------------------------- the shipped files


def test_shipped_files_pass_every_check(capsys: pytest.CaptureFixture[str]) -> None:
    assert check_deployment.main([]) == 0, capsys.readouterr().out
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(line.startswith("ok ") for line in lines), lines
    checked = {line.split()[1].rstrip(":") for line in lines}
    assert {"platform/docker/Dockerfile.cpu", "platform/docker/Dockerfile.gpu", "platform/kuberay/rayjob-train.yaml",
            "platform/kuberay/rayjob-tune.yaml", "platform/kuberay/rayservice.yaml",
            "platform/kuberay/mlflow-server.yaml", "platform/kuberay/cronjob-retrain.yaml",
            "platform/kuberay", "platform/ray-cluster.yaml"} <= checked


def test_platform_is_not_a_python_package() -> None:
    # A package named `platform` would shadow the standard library's module.
    assert not list((ROOT / "platform").rglob("__init__.py"))


def test_context_reads_the_installed_versions_and_the_mlflow_service(ctx: Context) -> None:
    import ray

    assert ctx.ray_version == ray.__version__
    assert ctx.mlflow_uri == "http://ncf-mlflow:5050"
    assert {"database-uri", "aws-access-key-id", "aws-secret-access-key", "s3-endpoint-url"} <= ctx.secret_keys[
        "ncf-mlflow"]


def test_a_broken_root_fails_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for part in ("conf", "platform"):
        shutil.copytree(ROOT / part, tmp_path / part)
    shutil.copy(ROOT / ".dockerignore", tmp_path)
    job = tmp_path / "platform/kuberay/rayjob-train.yaml"
    job.write_text(job.read_text().replace('rayVersion: "', 'rayVersion: "1.', 1))
    assert check_deployment.main(["--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL  platform/kuberay/rayjob-train.yaml: RayJob ncf-train rayVersion is '1." in out
    assert "ok    platform/kuberay/rayservice.yaml" in out


# ----------------------------------------------------------------------------- KubeRay manifests


def test_misspelled_rayjob_field_fails(tmp_path: Path, ctx: Context) -> None:
    path = broken(tmp_path, KUBERAY / "rayjob-train.yaml", "shutdownAfterJobFinishes:", "shutdownAfterJobFinish:")
    problem = r"rayjob-train\.yaml: RayJob ncf-train spec: .*'shutdownAfterJobFinish' was unexpected"
    with pytest.raises(DeploymentError, match=problem):
        kuberay.check_kuberay_manifest(path, ctx)


def test_misspelled_field_deep_in_the_pod_template_fails(tmp_path: Path, ctx: Context) -> None:
    path = broken(tmp_path, KUBERAY / "rayjob-train.yaml", "mountPath: /mnt/ncf", "mountpath: /mnt/ncf")
    with pytest.raises(DeploymentError, match=r"volumeMounts\[0\]: .*'mountpath' was unexpected"):
        kuberay.check_kuberay_manifest(path, ctx)


def test_wrong_type_fails(tmp_path: Path, ctx: Context) -> None:
    path = broken(tmp_path, KUBERAY / "rayjob-train.yaml", "replicas: 2", 'replicas: "two"')
    with pytest.raises(DeploymentError, match=r"workerGroupSpecs\[0\]\.replicas: 'two' is not of type 'integer'"):
        kuberay.check_kuberay_manifest(path, ctx)


def test_misspelled_metadata_field_fails(tmp_path: Path, ctx: Context) -> None:
    path = broken(tmp_path, KUBERAY / "rayservice.yaml", "  labels:", "  lables:")
    with pytest.raises(DeploymentError, match=r"RayService ncf-serve metadata: .*'lables' was unexpected"):
        kuberay.check_kuberay_manifest(path, ctx)


def test_int_or_string_quantities_accept_both_and_nothing_else(tmp_path: Path, ctx: Context) -> None:
    source = KUBERAY / "rayjob-train.yaml"
    ok = broken(tmp_path, source, 'cpu: "8"', "cpu: 8")
    kuberay.check_kuberay_manifest(ok, ctx)
    path = broken(tmp_path, source, "nvidia.com/gpu: 1", "nvidia.com/gpu: [1]")
    with pytest.raises(DeploymentError, match=r"nvidia\.com/gpu"):
        kuberay.check_kuberay_manifest(path, ctx)


def test_rayjob_with_both_cluster_spec_and_selector_fails(tmp_path: Path, ctx: Context) -> None:
    path = broken(tmp_path, KUBERAY / "rayjob-train.yaml", "  rayClusterSpec:",
                  "  clusterSelector:\n    ray.io/cluster: shared\n  rayClusterSpec:")
    with pytest.raises(DeploymentError, match="exactly one of spec.rayClusterSpec .* not both"):
        kuberay.check_kuberay_manifest(path, ctx)


@pytest.mark.parametrize(("old", "new", "problem"), [
    ("shutdownAfterJobFinishes: true", "shutdownAfterJobFinishes: false", "ttlSecondsAfterFinished > 0 needs"),
    ("submissionMode: K8sJobMode", "submissionMode: BatchMode", "'BatchMode' is not one of K8sJobMode"),
    ("name: ncf-train", "name: ncf-train-" + "x" * 40, "DNS-1035 label .* at most 47"),
    ("name: ncf-train", "name: 9-train", "DNS-1035 label"),
])
def test_operator_rules(tmp_path: Path, ctx: Context, old: str, new: str, problem: str) -> None:
    path = broken(tmp_path, KUBERAY / "rayjob-train.yaml", old, new)
    with pytest.raises(DeploymentError, match=problem):
        kuberay.check_kuberay_manifest(path, ctx)


@pytest.mark.parametrize(("old", "new", "problem"), [
    ('rayVersion: "{v}"', 'rayVersion: "1.0.0"', "rayVersion is '1.0.0', the installed Ray is {v}"),
    ("ncf-movielens:{v}-py311-cpu", "ncf-movielens:1.0.0-py311-cpu", "image ncf-movielens:1.0.0-py311-cpu carries Ray "
                                                                     "1.0.0, the installed Ray is {v}"),
    ("ncf-movielens:{v}-py311-gpu", "ncf-movielens:{v}-py311-cpu", "runs on GPUs but is not a GPU build"),
    ("ncf-movielens:{v}-py311-cpu", "ncf-movielens:latest", "needs a fixed tag"),
])
def test_ray_version_and_images_must_agree(tmp_path: Path, ctx: Context, old: str, new: str, problem: str) -> None:
    v = ctx.ray_version
    path = broken(tmp_path, KUBERAY / "rayjob-train.yaml", old.format(v=v), new.format(v=v))
    with pytest.raises(DeploymentError, match=re.escape(problem.format(v=v))):
        kuberay.check_kuberay_manifest(path, ctx)


@pytest.mark.parametrize(("old", "new", "problem"), [
    ("train.num_workers=2", "train.num_workers=3", "train.num_workers is 3 but the GPU worker groups hold 2 GPUs"),
    ("train.use_gpu=true", "train.use_gpu=false", "train.use_gpu is false"),
    ("train.cpus_per_worker=4", "train.cpus_per_worker=16", "has 8 CPUs"),
    ("train.num_workers=2", "train.num_wokers=2", "entrypoint overrides do not load with conf/: unknown config key"),
    ("    python -m jobs.train\n", "    python -m jobs.trian\n", "not one of jobs.train, jobs.retrain, jobs.tune"),
    ("num-cpus: \"0\"", "num-cpus: \"4\"", "the head must take no"),
    ("http://ncf-mlflow:5050", "http://mlflow:5000", "MLFLOW_TRACKING_URI is http://mlflow:5000, the MLflow Service"),
])
def test_train_job_agrees_with_its_overrides(tmp_path: Path, ctx: Context, old: str, new: str, problem: str) -> None:
    path = broken(tmp_path, KUBERAY / "rayjob-train.yaml", old, new)
    with pytest.raises(DeploymentError, match=problem):
        kuberay.check_kuberay_manifest(path, ctx)


@pytest.mark.parametrize(("old", "new", "problem"), [
    ("shutdownAfterJobFinishes:", "shutdownAfterJobFinish:",
     r"ConfigMap ncf-retrain-rayjob rayjob.yaml: RayJob ncf-retrain spec: .*'shutdownAfterJobFinish' was unexpected"),
    ("        python -m jobs.retrain\n", "        python -m jobs.retrian\n",
     "not one of jobs.train, jobs.retrain, jobs.tune"),
    ("train.num_workers=2", "train.num_workers=3", "train.num_workers is 3 but the GPU worker groups hold 2 GPUs"),
    ("rayVersion: \"2.60.0\"", "rayVersion: \"1.0.0\"", "rayVersion is '1.0.0'"),
    ("concurrencyPolicy: Forbid", "concurrencyPolicy: Allow", "concurrencyPolicy must be Forbid"),
    ('verbs: ["create", "delete", "get"]', 'verbs: ["get"]', "no Role of this file allowing create"),
    ("serviceAccountName: ncf-retrain-scheduler", "serviceAccountName: default", "'default' is not a ServiceAccount"),
    ("create -f /etc/ncf-retrain/rayjob.yaml", "create -f /etc/other.yaml", "must create /etc/ncf-retrain/rayjob.yaml"),
    ("startingDeadlineSeconds:", "startingDeadlineSecond:", "CronJob ncf-retrain: .*startingDeadlineSecond"),
])
def test_scheduled_retrain_is_checked_like_the_other_jobs(tmp_path: Path, ctx: Context, old: str, new: str,
                                                          problem: str) -> None:
    """The CronJob, its RBAC and the RayJob it creates from a ConfigMap: schemas, entrypoint, resources, wiring."""
    path = broken(tmp_path, KUBERAY / "cronjob-retrain.yaml", old, new)
    with pytest.raises(DeploymentError, match=problem):
        kuberay.check_kuberay_manifest(path, ctx)


def test_tune_job_needs_its_trials_to_fit(tmp_path: Path, ctx: Context) -> None:
    path = broken(tmp_path, KUBERAY / "rayjob-tune.yaml", "tune.workers_per_trial=1", "tune.workers_per_trial=3")
    with pytest.raises(DeploymentError, match="a trial needs 3 GPUs"):
        kuberay.check_kuberay_manifest(path, ctx)


@pytest.mark.parametrize(("old", "new", "problem"), [
    ("PYTHONUNBUFFERED: \"1\"", "PYTHONUNBUFFERED: 1", r"env_vars'\] must be of type Dict\[str, str\]"),
    ("    env_vars:\n", "    env_var:\n", "unknown field.* env_var"),
    ("    env_vars:\n", "    env_vars: [\n", "runtimeEnvYAML is not valid YAML"),
])
def test_invalid_runtime_env_fails(tmp_path: Path, ctx: Context, old: str, new: str, problem: str) -> None:
    path = broken(tmp_path, KUBERAY / "rayjob-train.yaml", old, new)
    with pytest.raises(DeploymentError, match=problem):
        kuberay.check_kuberay_manifest(path, ctx)


# ----------------------------------------------------------------------------- the RayService


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_loopback_serve_host_fails(tmp_path: Path, ctx: Context, host: str) -> None:
    path = broken(tmp_path, KUBERAY / "rayservice.yaml", "host: 0.0.0.0", f'host: "{host}"')
    with pytest.raises(DeploymentError, match="rayservice.yaml: RayService ncf-serve: .* loopback address"):
        kuberay.check_kuberay_manifest(path, ctx)


@pytest.mark.parametrize(("old", "new", "problem"), [
    ("import_path: serving.deployment:build_app", "import_path: serving.deployment:build_ap",
     "has no attribute 'build_ap'"),
    ("import_path: serving.deployment:build_app", "import_path: serving.nothere:build_app", "ModuleNotFoundError"),
    ("args: {}", "args: {max_replicas: 9}", "do not fit the worker groups' 4 CPUs"),
    ("args: {}", "args: {max_replica: 2}", "args: max_replica not in conf/serve.yaml"),
    ("args: {}", "args: {min_replicas: 3}", "args do not make a valid serve config"),
    ("args: {}", "deployments: [{name: Recommendations, num_replicas: 3}]", "sets num_replicas"),
    ("route_prefix: /", "route_prefx: /", "unknown key.* route_prefx"),
    ("port: 8000\n    applications", "port: 8080\n    applications", "conf/serve.yaml's port is 8000"),
    ("value: \"1\"", "value: \"0\"", "must set RAY_SERVE_PROXY_USE_GRPC=1"),
    ("args: {}", "args: {ingress: haproxy}", "must set RAY_SERVE_ENABLE_HA_PROXY=1 .*serve.ingress is haproxy"),
])
def test_serve_config_rules(tmp_path: Path, ctx: Context, old: str, new: str, problem: str) -> None:
    path = broken(tmp_path, KUBERAY / "rayservice.yaml", old, new)
    with pytest.raises(DeploymentError, match=problem):
        kuberay.check_kuberay_manifest(path, ctx)


# ----------------------------------------------------------------------------- built-in kinds, kustomize


@pytest.mark.parametrize(("change", "problem"), [
    (lambda docs: docs[0]["spec"].update(replicas="two"), r"Deployment ncf-mlflow: spec\.replicas: 'two' is not of"),
    (lambda docs: docs[0]["spec"]["template"]["spec"]["containers"][0].update(imagePullPolicie="Always"),
     "'imagePullPolicie' was unexpected"),
    (lambda docs: docs[0]["spec"]["template"]["spec"]["containers"][0]["args"].remove("--allowed-hosts"),
     "needs --allowed-hosts"),
    (lambda docs: docs[0]["spec"]["template"]["spec"]["containers"][0]["args"].__setitem__(-1, "localhost:*"),
     "does not admit Host ncf-mlflow:5050"),
    (lambda docs: docs[0]["spec"]["template"]["spec"]["containers"][0]["args"].__setitem__(5, "127.0.0.1"),
     "--host 127.0.0.1 .* loopback"),
    (lambda docs: docs[0]["spec"]["template"]["spec"]["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"]
     .update(key="db-uri"), "reads key 'db-uri' of Secret 'ncf-mlflow'"),
    (lambda docs: docs[1]["spec"]["ports"][0].update(targetPort=8080), "targets 8080, mlflow server listens on 5050"),
])
def test_broken_mlflow_deployment_fails(tmp_path: Path, ctx: Context, change: Callable, problem: str) -> None:
    path = edited(tmp_path, KUBERAY / "mlflow-server.yaml", change)
    with pytest.raises(DeploymentError, match=problem):
        kuberay.check_kuberay_manifest(path, ctx)


def test_broken_secret_and_claim_fail(tmp_path: Path, ctx: Context) -> None:
    path = broken(tmp_path, KUBERAY / "secret.example.yaml", "stringData:", "stringdata:")
    with pytest.raises(DeploymentError, match="Secret ncf-mlflow: .*'stringdata' was unexpected"):
        kuberay.check_kuberay_manifest(path, ctx)
    path = broken(tmp_path, KUBERAY / "shared-storage.yaml", "- ReadWriteMany", "ReadWriteMany")
    with pytest.raises(DeploymentError, match=r"PersistentVolumeClaim ncf-shared: spec\.accessModes"):
        kuberay.check_kuberay_manifest(path, ctx)


@pytest.fixture
def kuberay_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "kuberay"
    shutil.copytree(KUBERAY, folder, ignore=shutil.ignore_patterns("crds"))
    return folder


def test_kustomization_must_list_every_manifest(kuberay_copy: Path, ctx: Context) -> None:
    path = kuberay_copy / "kustomization.yaml"
    path.write_text(path.read_text().replace("  - rayjob-tune.yaml\n", ""))
    with pytest.raises(DeploymentError, match="kustomization.yaml: rayjob-tune.yaml is not listed under resources"):
        kuberay.check_kustomization(kuberay_copy, ctx)
    path.write_text(path.read_text().replace("resources:\n", "resources:\n  - rayjob-tune.yaml\n  - nothere.yaml\n"))
    with pytest.raises(DeploymentError, match="resources lists nothere.yaml, which does not exist"):
        kuberay.check_kustomization(kuberay_copy, ctx)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_must_render(kuberay_copy: Path, ctx: Context) -> None:
    assert "renders 11 objects" in kuberay.check_kustomization(kuberay_copy, ctx)
    path = kuberay_copy / "kustomization.yaml"
    path.write_text(path.read_text().replace("labels:\n  - pairs:", "labels:\n  - pairz:"))
    with pytest.raises(DeploymentError, match="`kubectl kustomize` failed"):
        kuberay.check_kustomization(kuberay_copy, ctx)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_image_rewrite_must_keep_the_ray_version(kuberay_copy: Path, ctx: Context) -> None:
    path = kuberay_copy / "kustomization.yaml"
    text = path.read_text()
    path.write_text(text.replace("newName: ncf-movielens", "newName: ncf-movielens\n    newTag: 1.0.0"))
    with pytest.raises(DeploymentError, match="carries Ray 1.0.0"):
        kuberay.check_kustomization(kuberay_copy, ctx)
    # Only the train job left: nothing defines the claim it mounts.
    path.write_text(text.replace(text[text.index("resources:"):text.index("labels:")],
                                 "resources:\n  - rayjob-train.yaml\n"))
    for name in ("mlflow-server.yaml", "rayjob-tune.yaml", "cronjob-retrain.yaml", "rayservice.yaml",
                 "shared-storage.yaml"):
        (kuberay_copy / name).unlink()
    with pytest.raises(DeploymentError, match="mounts PersistentVolumeClaim ncf-shared, which nothing here defines"):
        kuberay.check_kustomization(kuberay_copy, ctx)


def test_kustomize_is_skipped_without_kubectl(kuberay_copy: Path, ctx: Context,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kuberay.shutil, "which", lambda name: None)
    assert "SKIPPED: kubectl not found" in kuberay.check_kustomization(kuberay_copy, ctx)


# ----------------------------------------------------------------------------- Dockerfiles, cluster launcher


@pytest.mark.parametrize(("old", "new", "problem"), [
    ("pip install --no-cache-dir --index-url", "pip install --index-url", "DL3042"),
    ("WORKDIR /home/ray", "RUN cd /home/ray", "DL3003"),
    ("rayproject/ray:2", "rayproject/ray:1", "carries Ray 1"),
    ("torch==2.13.0 \\", "torch==2.12.0 \\", "torch==2.12.0, the project's environment has torch"),
    ("USER 1000:100", "USER 1000:100\nUSER root", "DL3002"),
])
def test_bad_dockerfile_fails(tmp_path: Path, ctx: Context, old: str, new: str, problem: str) -> None:
    path = broken(tmp_path, ROOT / base.DOCKERFILES[0], old, new)
    with pytest.raises(DeploymentError, match=f"Dockerfile.cpu: .*{problem}"):
        dockerfiles.check_dockerfile(path, ctx)


def test_cpu_base_image_in_the_gpu_dockerfile_fails(tmp_path: Path, ctx: Context) -> None:
    path = broken(tmp_path, ROOT / base.DOCKERFILES[1], "-py311-gpu\n", "-py311-cpu\n")
    with pytest.raises(DeploymentError, match="not a GPU build"):
        dockerfiles.check_dockerfile(path, ctx)


def test_dockerignore_must_keep_stores_out(tmp_path: Path, ctx: Context) -> None:
    path = broken(tmp_path, ROOT / ".dockerignore", "\nmlruns\n", "\n")
    with pytest.raises(DeploymentError, match="does not exclude mlruns"):
        dockerfiles.check_dockerignore(path, ctx)


@pytest.mark.parametrize(("old", "new", "problem"), [
    ("idle_timeout_minutes:", "idle_timeout_minute:", "Ray's cluster schema: .*'idle_timeout_minute' was "
                                                       "unexpected"),
    ("min_workers: 2", "min_workers: two", r"min_workers: 'two' is not of type 'integer'"),
    ("resources: {CPU: 0}", "resources: {CPU: 2}", "needs resources CPU: 0"),
    ("resources: {CPU: 8, GPU: 1}", "resources: {CPU: 8}", "no worker node type declares GPU"),
    ("ncf-movielens:2", "ncf-movielens:1", "carries Ray 1"),
    ("head_node_type: head", "head_node_type: boss", "`ray up` would reject it"),
])
def test_broken_cluster_config_fails(tmp_path: Path, ctx: Context, old: str, new: str, problem: str) -> None:
    path = broken(tmp_path, ROOT / base.CLUSTER_CONFIG, old, new)
    with pytest.raises(DeploymentError, match=f"ray-cluster.yaml: .*{problem}"):
        cluster_launcher.check_cluster_config(path, ctx)


# ----------------------------------------------------------------------------- the pieces


def test_strict_schema_closes_objects_unless_told_otherwise() -> None:
    schema = kubernetes_schemas.strict_schema({"type": "object", "properties": {
        "a": {"type": "object", "properties": {"b": {"type": "string"}}},
        "open": {"type": "object", "properties": {}, "x-kubernetes-preserve-unknown-fields": True},
        "map": {"type": "object", "additionalProperties": {"type": "string"}},
        "port": {"x-kubernetes-int-or-string": True},
    }})
    assert schema["additionalProperties"] is False
    assert schema["properties"]["a"]["additionalProperties"] is False
    assert "additionalProperties" not in schema["properties"]["open"]
    assert schema["properties"]["map"]["additionalProperties"] == {"type": "string"}
    assert schema["properties"]["port"]["anyOf"] == [{"type": "integer"}, {"type": "string"}]


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.1.2.3", True), ("localhost", True), ("::1", True), ("[::1]", True),
    ("0.0.0.0", False), ("::", False), ("10.0.0.5", False), ("ncf-mlflow", False),
])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert base.is_loopback(host) is loopback


@pytest.mark.parametrize(("image", "version"), [
    ("ncf-movielens:2.60.0-py311-cpu", "2.60.0"),
    ("registry.example.com:5000/team/ncf-movielens:2.60.0-py311-gpu", "2.60.0"),
    ("rayproject/ray:2.60.0-py311-gpu@sha256:abc", "2.60.0"),
    ("postgres:17", None),
    ("registry.example.com:5000/postgres", None),
])
def test_image_ray_version(image: str, version: str | None) -> None:
    assert base.image_ray_version(image) == version
