"""Shared fixtures: the tiny GPT2 (built once per session) and an S3 endpoint served by moto on 127.0.0.1."""

from __future__ import annotations

import os

# Ray on loopback only, set before anything imports ray (see fengshen_batch.pipeline.init_ray).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import pytest  # noqa: E402

from fengshen_batch.loading import load_replica  # noqa: E402
from fengshen_batch.tiny_model import build_tiny_gpt2  # noqa: E402

N_POSITIONS = 64  # small, so rolling windows and prompt truncation are exercised by short texts


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"), n_positions=N_POSITIONS)


@pytest.fixture(scope="session")
def replica(tiny_model_dir):
    return load_replica(str(tiny_model_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real HTTP S3 API (moto's server, as s3fs's own tests use) on loopback; stopped after the session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_options(s3_endpoint):
    """s3fs storage options for the moto endpoint (moto accepts any credentials)."""
    return {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing-secret"}


def make_bucket(s3_options: dict, name: str) -> None:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=s3_options["endpoint_url"],
        aws_access_key_id=s3_options["key"],
        aws_secret_access_key=s3_options["secret"],
        region_name="us-east-1",
    )
    if name not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
        client.create_bucket(Bucket=name)


PLANTED_SECRET = "planted-Secret-4f1c9e"  # must never appear in anything a job writes or prints


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole suite, on loopback. AWS credentials are in its environment (as on a real
    node) before it starts, so workers inherit them; the secret is a planted value to grep for."""
    import ray

    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": PLANTED_SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    ctx = ray.init(num_cpus=4, num_gpus=0, include_dashboard=False)
    address = ctx.address_info["gcs_address"]
    assert address.startswith("127.0.0.1:"), address
    yield address
    ray.shutdown()
