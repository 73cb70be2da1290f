"""Shared fixtures: a real multi-node local Ray cluster, a real S3-compatible server (moto, over HTTP on
127.0.0.1), generated chest-X-ray-like images (good and broken, every format), and tiny checkpoints.

The helpers behind them live in ``tests/support/``. Every Ray process the tests start lives under its own short
--temp-dir and is killed in teardown.

Markers (registered in pyproject.toml): a test that uses a fixture in ``CLUSTER_FIXTURES`` (a Ray cluster, the
S3 server, a model trained on the cluster) is marked ``cluster`` here; modules that run whole jobs mark
themselves. ``pytest -m "not cluster"`` runs the unit layer.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from support.cluster import LocalCluster, free_port
from support.images import make_labelled_tree, mixed_files, write_files
from support.jobs import ROOT

# Set before anything imports boto3/pyarrow/ray, so every process the tests start (Ray nodes,
# workers, job subprocesses) inherits the same offline, fake-credential S3 set-up.
S3_PORT = free_port()
os.environ.update(
    {
        "RAY_USAGE_STATS_ENABLED": "0",
        # Ray 2.60's token authentication, with a token of this test session's own (nothing written to ~/.ray).
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "HF_HUB_OFFLINE": "1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}",
        "PYTHONPATH": str(ROOT / "lib") + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
)

# fixtures that need the local Ray cluster or the S3 server: the tests that use them are marked `cluster`
CLUSTER_FIXTURES = {"ray_cluster", "ray_driver", "trained_model", "s3_server", "s3_bucket"}
# fixtures that train on the cluster first (a minute or more): their tests are also marked `slow`
SLOW_FIXTURES = {"trained_model", "search"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & CLUSTER_FIXTURES:
            item.add_marker(pytest.mark.cluster)
        if used & SLOW_FIXTURES:
            item.add_marker(pytest.mark.slow)


# --------------------------------------------------------------------------- S3 (moto server mode)


@pytest.fixture(scope="session")
def s3_server():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    yield os.environ["AWS_ENDPOINT_URL"]
    server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    import boto3

    name = "cxr-" + secrets.token_hex(4)
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    yield name, client


# --------------------------------------------------------------------------- Ray cluster


@pytest.fixture(scope="session")
def ray_cluster():
    cluster = LocalCluster()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def ray_driver(ray_cluster):
    """This test process connected to the local cluster as a Ray driver."""
    import ray

    ray.init(address=ray_cluster.address, logging_level="ERROR")
    yield ray_cluster
    ray.shutdown()


# --------------------------------------------------------------------------- images and models


@pytest.fixture
def mixed_folder(tmp_path) -> tuple[Path, dict]:
    files = mixed_files()
    return write_files(tmp_path / "images", files), files


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A random-weight mobilenet_v2 checkpoint at 64 px (fast on CPU), threshold 0.5."""
    import torch

    from cxr.checkpoint import ModelInfo, save_checkpoint
    from cxr.models import create_model
    from cxr.preprocess import PreprocessSpec

    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("models") / "tiny")
    save_checkpoint(
        create_model("mobilenet_v2"), ModelInfo("mobilenet_v2", PreprocessSpec(input_size=64), threshold=0.5), path
    )
    return path


@pytest.fixture(scope="session")
def trained_model(ray_driver, tmp_path_factory):
    """A mobilenet_v2 fine-tuned from ImageNet weights for 3 epochs on the synthetic task (64 px)."""
    from cxr.train import TrainConfig, train

    root = tmp_path_factory.mktemp("train")
    data = make_labelled_tree(root / "data")
    cfg = TrainConfig(
        data=str(data),
        output=str(root / "run"),
        weights="imagenet",
        epochs=3,
        image_size=64,
        batch_size=16,
        lr=1e-3,
        oversample=2,
        val_fraction=0.25,
    )
    return train(cfg)
