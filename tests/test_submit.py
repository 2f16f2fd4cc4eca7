"""`fengshen-batch submit` through the Ray Jobs API against a real head (`ray start --head`, with the
dashboard, on 127.0.0.1), with input and output on the moto S3 server."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import s3fs
import yaml

from fengshen_batch.submit import default_submission_id
from tests.helpers import PLANTED_SECRET, make_bucket, write_texts

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CLIENT_ENV = {"RAY_AUTH_MODE": "token"}  # clients send the token from ~/.ray/auth_token


def _jobs_api(address: str, expression: str):
    """Evaluate `expression` on a JobSubmissionClient `c` in a fresh process (Ray reads the client's auth mode
    once per process, so this process, which already runs Ray, cannot switch to token mode)."""
    code = (
        "import json, sys; from ray.job_submission import JobSubmissionClient; "
        f"c = JobSubmissionClient({address!r}); print(json.dumps({expression}, default=str))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **CLIENT_ENV})  # fmt: skip
    if res.returncode:
        raise RuntimeError(res.stderr[-2000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def ray_head(s3_endpoint):
    """A Ray head with the Jobs API on loopback, token authentication on (Ray's default here)."""
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    dashboard = _free_port()
    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # loopback only
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",  # the head's `python` has the project, as in the image
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": PLANTED_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_endpoint,
    }
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block", "--port", str(_free_port()),
        "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
        "--num-cpus", "4", "--num-gpus", "0", "--disable-usage-stats", "--temp-dir", temp,
        # the suite's own Ray already holds the default agent and metrics ports on this machine
        *[arg for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
                           "--runtime-env-agent-port", "--ray-client-server-port")
          for arg in (flag, str(_free_port()))],
    ]  # fmt: skip
    head = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                _jobs_api(address, "c.list_jobs()")
                break
            except RuntimeError:
                if time.monotonic() > deadline or head.poll() is not None:
                    raise
                time.sleep(1)
        yield address
    finally:
        head.terminate()
        head.wait(timeout=60)
        shutil.rmtree(temp, ignore_errors=True)


def _spec(tmp_path, s3_endpoint, model, name="nightly-test", output="s3://submit/out/{date}/") -> Path:
    spec = {
        "kind": "score", "name": name, "model": model, "input": "s3://submit/in/", "output": output,
        "actors": 1, "shard_rows": 8, "storage": {"endpoint_url": s3_endpoint},
    }  # fmt: skip
    path = tmp_path / "jobs" / f"{name}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(spec))
    return path


def _submit(tmp_path, spec: Path, *extra, env=None):
    cmd = [str(BIN / "fengshen-batch"), "submit", str(spec), "--working-dir", str(tmp_path), *extra]
    run_env = {**os.environ, **CLIENT_ENV, "FENGSHEN_RUN_DATE": "2026-11-21", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=run_env)


def test_submit_wait_runs_once_and_reports_failures(
    tmp_path, ray_head, s3_options, s3_endpoint, tiny_model_dir
):
    make_bucket(s3_options, "submit")
    fs = s3fs.S3FileSystem(**s3_options)
    rows = write_texts(tmp_path / "local-in", files=(10, 10))
    for f in (tmp_path / "local-in").iterdir():
        fs.put(str(f), f"submit/in/{f.name}")
    shutil.rmtree(tmp_path / "local-in")
    spec = _spec(tmp_path, s3_endpoint, str(tiny_model_dir))

    start = time.monotonic()
    res = _submit(tmp_path, spec, "--address", ray_head, "--wait")
    took = time.monotonic() - start
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    print(f"submit --wait to SUCCEEDED: {took:.1f}s")
    sid = "nightly-test-20261121"
    assert f"{sid}: SUCCEEDED" in res.stdout
    fs.invalidate_cache()
    out = "submit/out/2026-11-21"
    assert fs.exists(f"{out}/_SUCCESS")
    manifest = json.loads(fs.cat_file(f"{out}/manifest.json"))
    assert manifest["counts"]["input_rows"] == len(rows) == manifest["counts"]["result_rows"]
    first_manifest = fs.info(f"{out}/manifest.json")["LastModified"]

    # the same nightly job again: refused by Ray (same submission id), reported plainly, not run again
    again = _submit(tmp_path, spec, "--address", ray_head, "--wait")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "already submitted" in again.stdout and "Traceback" not in again.stdout + again.stderr
    assert _jobs_api(ray_head, "[j.submission_id for j in c.list_jobs()]").count(sid) == 1
    fs.invalidate_cache()
    assert fs.info(f"{out}/manifest.json")["LastModified"] == first_manifest
    info = _jobs_api(ray_head, f"c.get_job_info({sid!r}).dict()")
    assert info["runtime_env"]["env_vars"] == {"FENGSHEN_RUN_DATE": "2026-11-21"}  # the driver's {date}
    assert PLANTED_SECRET not in json.dumps(info)
    assert PLANTED_SECRET not in _jobs_api(ray_head, f"c.get_job_logs({sid!r})")

    # a job that fails on the cluster: --wait exits non-zero with the job's error
    bad = _spec(tmp_path, s3_endpoint, "/nonexistent/model", name="broken-test", output="s3://submit/bad/")
    res = _submit(tmp_path, bad, "--address", ray_head, "--wait")
    assert res.returncode == 1, res.stdout[-2000:]
    assert "broken-test-20261121: FAILED" in res.stdout and "model not found" in res.stdout


def test_auth_failure_says_what_to_set(tmp_path, ray_head, s3_endpoint):
    spec = _spec(tmp_path, s3_endpoint, "m", name="auth-test")
    res = _submit(tmp_path, spec, "--address", ray_head, env={"RAY_AUTH_TOKEN": "not-the-token"})
    assert res.returncode == 2
    assert "token authentication failed" in res.stderr and "RAY_AUTH_TOKEN" in res.stderr
    assert "Traceback" not in res.stderr


def test_submission_ids_and_spec_checks(tmp_path, monkeypatch):
    from fengshen_batch.spec import SpecError
    from fengshen_batch.submit import submit

    monkeypatch.setenv("FENGSHEN_RUN_DATE", "2026-11-21")
    assert default_submission_id("nightly-score") == "nightly-score-20261121"
    with pytest.raises(SpecError, match="no `name`"):
        default_submission_id(None)
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"kind": "score", "name": "x", "model": "m", "input": "i", "output": "o",
                                    "runtime_env": {"env_vars": {"AWS_SECRET_ACCESS_KEY": "k"}}}))  # fmt: skip
    with pytest.raises(SpecError, match="look like credentials"):
        submit(str(spec), "http://127.0.0.1:9", working_dir=str(tmp_path))
    with pytest.raises(SpecError, match="inside the working dir"):
        submit(str(spec), "http://127.0.0.1:9", working_dir=str(tmp_path / "elsewhere"))
