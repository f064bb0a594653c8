"""Offline checks of the deployment files in platform/ (`make check-deploy`, `python -m jobs.check_deployment`):
they must be valid and agree with conf/ and Ray. No cluster, Docker daemon or network is needed, so a
broken manifest fails here rather than half-way through a rollout. One module per kind of file or rule:

- `kubernetes_schemas`: KubeRay RayJob / RayService manifests against the CRDs' OpenAPI schemas vendored
  in platform/kuberay/crds/, with unknown fields rejected (as `kubectl apply` does), plus the operator's
  own rules that the schemas lack; built-in kinds (Deployment, Service, Secret, PersistentVolumeClaim)
  with kubernetes-validate;
- `config_checks`: `runtimeEnvYAML` through Ray's RuntimeEnv; `serveConfigV2` through Ray Serve's
  ServeDeploySchema, its import path importable, its proxy reachable (no loopback host) and its settings
  from conf/serve.yaml (`args` may override); the train/tune entrypoints' `--set` overrides load with
  conf/; every job and the service reach the MLflow Service;
- `kuberay`: each manifest by kind; rayVersion and image tags = the installed Ray; the worker groups' GPUs
  and CPUs fit what the entrypoints and conf/serve.yaml ask for; `kubectl kustomize platform/kuberay`
  renders (skipped, saying so, when kubectl is absent);
- `mlflow_server`: the MLflow server's Deployment and Service;
- `cluster_launcher`: the Ray cluster-launcher config against Ray's bundled schema;
- `dockerfiles`: the Dockerfiles with hadolint, and the .dockerignore;
- `base`: the context every check compares with, and what they share; `checklist`: which file gets
  which check, and the run over all of them.
"""
