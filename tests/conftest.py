"""Shared fixtures: the tiny GPT2 (built once per session) and an S3 endpoint served by moto on 127.0.0.1."""

from __future__ import annotations

import os

# Ray on loopback only, set before anything imports ray (see fengshen_batch.workers.cluster.init_ray).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# The CUDA decode kernels (engine/triton_decode.py) run in Triton's interpreter on this machine's CPU. The flag
# must be set before anything imports triton: its own library functions are decorated at import.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fengshen_batch.model.load import load_replica  # noqa: E402
from fengshen_batch.tiny_model import build_tiny_gpt2  # noqa: E402
from tests.helpers import PLANTED_SECRET  # noqa: E402

N_POSITIONS = 64  # small, so rolling windows and prompt truncation are exercised by short texts


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"), n_positions=N_POSITIONS)


@pytest.fixture(scope="session")
def replica(tiny_model_dir):
    return load_replica(str(tiny_model_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def hf_model(tiny_model_dir):
    """Hugging Face's own GPT2LMHeadModel over the same checkpoint: the independent reference."""
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(tiny_model_dir, dtype="float32").eval().requires_grad_(False)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real HTTP S3 API (moto's server, as s3fs's own tests use) on loopback; stopped after the session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # Any S3 client of the suite that is not told an endpoint uses this one, never a real AWS host.
    previous = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    yield endpoint
    server.stop()
    if previous is None:
        os.environ.pop("AWS_ENDPOINT_URL", None)
    else:
        os.environ["AWS_ENDPOINT_URL"] = previous


@pytest.fixture
def s3_options(s3_endpoint):
    """s3fs storage options for the moto endpoint (moto accepts any credentials)."""
    return {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing-secret"}


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint):
    """One local Ray for the whole suite, on loopback. The standard AWS variables are in its environment (as
    on a real node) before it starts, so workers inherit them (AWS_ENDPOINT_URL included, from s3_endpoint);
    the secret is a planted value to grep for."""
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
