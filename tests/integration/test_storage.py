"""Where Ray Train and Tune keep checkpoints (`train.storage_uri`): the local folder or an S3-compatible store
whose endpoint and region come from the environment, never credentials; and what a submitted job carries."""

from __future__ import annotations

import pickle
from pathlib import Path

import pyarrow.fs
import pytest

from jobs import submit
from ncf.config import Config, ConfigError, with_values
from ncf.integrations.ray_train import storage_location

SECRETS = {"AWS_ACCESS_KEY_ID": "AKIA-unit-test", "AWS_SECRET_ACCESS_KEY": "unit-test-secret-value"}


def options(fs: pyarrow.fs.S3FileSystem) -> dict:
    """The settings an S3 filesystem travels with when Ray pickles it to its workers."""
    return fs.__reduce__()[1][0]


def test_default_is_the_local_checkpoint_dir(config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    assert config.train.storage_uri is None  # conf/train.yaml's default
    monkeypatch.chdir(tmp_path)
    storage = storage_location(with_values(config, {"train.checkpoint_dir": "ckpt"}).train, environ={})
    assert isinstance(storage.filesystem, pyarrow.fs.LocalFileSystem)
    assert storage.path == str(tmp_path / "ckpt") and storage.uri == storage.path
    assert storage.join("sweep-1", "ncf_config.yaml") == f"{tmp_path}/ckpt/sweep-1/ncf_config.yaml"


@pytest.mark.parametrize("uri", ["/srv/ncf/checkpoints", "file:///srv/ncf/checkpoints"])
def test_a_local_folder(config: Config, uri: str):
    storage = storage_location(with_values(config, {"train.storage_uri": uri}).train, environ={})
    assert isinstance(storage.filesystem, pyarrow.fs.LocalFileSystem) and storage.path == "/srv/ncf/checkpoints"


def test_s3_with_an_endpoint_from_the_environment(config: Config):
    train = with_values(config, {"train.storage_uri": "s3://ncf-bucket/runs/checkpoints/"}).train
    env = {"MLFLOW_S3_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_DEFAULT_REGION": "eu-west-1", **SECRETS}
    storage = storage_location(train, environ=env)
    assert isinstance(storage.filesystem, pyarrow.fs.S3FileSystem)
    # RunConfig(storage_path=...) with a custom filesystem takes the path without its scheme.
    assert storage.path == "ncf-bucket/runs/checkpoints" and storage.uri == "s3://ncf-bucket/runs/checkpoints"
    settings = options(storage.filesystem)
    assert (settings["endpoint_override"], settings["scheme"], settings["region"]) == (
        "127.0.0.1:9000", "http", "eu-west-1")
    # Credentials stay in each process's environment: none inside the filesystem Ray pickles to workers.
    assert settings["access_key"] is None and settings["secret_key"] is None
    assert SECRETS["AWS_SECRET_ACCESS_KEY"].encode() not in pickle.dumps(storage.filesystem)


def test_s3_endpoint_precedence_and_default(config: Config):
    train = with_values(config, {"train.storage_uri": "s3://ncf-bucket"}).train
    env = {"AWS_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": "http://mlflow-s3:9000",
           "AWS_ENDPOINT_URL": "https://minio.internal:9443", "AWS_ENDPOINT_URL_S3": "s3.internal:9000"}
    storage = storage_location(train, environ=env)
    assert storage.path == "ncf-bucket"
    assert (options(storage.filesystem)["endpoint_override"], options(storage.filesystem)["scheme"]) == (
        "s3.internal:9000", "https")  # no scheme given: https
    del env["AWS_ENDPOINT_URL_S3"]
    assert options(storage_location(train, environ=env).filesystem)["endpoint_override"] == "minio.internal:9443"
    only_region = storage_location(train, environ={"AWS_REGION": "us-east-1"})
    assert options(only_region.filesystem)["endpoint_override"] == ""  # AWS itself


@pytest.mark.parametrize("uri, problem", [
    ("gs://ncf-bucket/checkpoints", r"unsupported scheme 'gs://'.*s3://bucket/prefix"),
    ("hdfs://namenode/checkpoints", r"unsupported scheme 'hdfs://'"),
    ("s3:///checkpoints", r"names no bucket"),
])
def test_unsupported_locations_are_config_errors(config: Config, uri: str, problem: str):
    with pytest.raises(ConfigError, match=r"train\.storage_uri .*" + problem):
        storage_location(with_values(config, {"train.storage_uri": uri}).train, environ={})


def test_a_submitted_job_carries_the_s3_settings(monkeypatch: pytest.MonkeyPatch):
    for name in submit.FORWARDED:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5050")
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "")  # set but empty: not forwarded
    monkeypatch.setenv("AWS_PROFILE", "someone")  # not a forwarded name
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    env = submit.runtime_env("http://127.0.0.1:8265")["env_vars"]
    assert env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5050"
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    assert {name: env[name] for name in SECRETS} == SECRETS
    assert "AWS_SESSION_TOKEN" not in env and "AWS_PROFILE" not in env and "AWS_REGION" not in env
