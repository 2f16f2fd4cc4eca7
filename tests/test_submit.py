"""`fengshen-batch submit` through the Ray Jobs API against real heads (`ray start --head`, with the dashboard,
on 127.0.0.1): one with token authentication, one without. Every submit runs from a directory of its own,
with the spec in another one outside any git repo, as a cron job or a notebook would."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import s3fs
import yaml

from fengshen_batch.errors import SubmitError
from fengshen_batch.submission.plan import default_submission_id, local_version, plan
from tests.helpers import PLANTED_SECRET, make_bucket, write_texts

BIN = Path(sys.executable).parent
DATE = {"FENGSHEN_RUN_DATE": "2026-11-21"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 25) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 16384))
            return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"({e.strerror})"


@dataclass
class Head:
    """A running `ray start --head`, and what its clients need to talk to it."""

    address: str
    process: subprocess.Popen
    temp: Path
    client_env: dict  # Ray reads the client's auth mode from RAY_AUTH_MODE, once per process
    gcs: str = ""  # 127.0.0.1:PORT, what `ray.init(address=...)` joins
    metrics: int = 0  # the Prometheus export port

    def diagnose(self) -> str:
        """Whether the head still runs, and the tails of its logs: for assertion messages (a head that dies
        mid-test shows as "Remote end closed connection", which says nothing about why)."""
        code = self.process.poll()
        parts = [f"head pid {self.process.pid}: " + ("alive" if code is None else f"exited with {code}")]
        logs = self.temp / "session_latest" / "logs"
        dashboard = [*sorted(logs.glob("dashboard*.log")), *sorted(logs.glob("dashboard*.err"))]
        for path in [self.temp / "ray-start.log", logs / "gcs_server.out", logs / "raylet.out", *dashboard]:
            if path.suffix == ".err" and not (path.exists() and path.stat().st_size):
                continue  # crash tracebacks land in .err files: only the non-empty ones say anything
            parts.append(f"--- {path.name} ---\n{_tail(path, 15 if path in dashboard else 40)}")
        return "\n".join(parts)


def _up(head: Head) -> bool:
    """Whether `ray start` has started every process (its dashboard answers before that) and jobs can be listed."""
    if b"block forever" not in (head.temp / "ray-start.log").read_bytes():
        return False
    try:
        _jobs_api(head, "c.list_jobs()")
    except RuntimeError:
        return False
    return True


@contextlib.contextmanager
def _head(s3_endpoint: str, auth_mode: str, default_temp: bool = False):
    """`default_temp`: the head keeps Ray's own temp dir (/tmp/ray), as a plain `ray start --head` does, so
    that a plain `ray.init()` on this machine finds it; it runs no dashboard (nothing here submits to it), so
    it is up once `ray start` says so."""
    temp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    dashboard, gcs, metrics = _free_port(), _free_port(), _free_port()
    env = {
        **os.environ,
        "RAY_AUTH_MODE": auth_mode,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # loopback only
        # no 30 s drain on SIGTERM (it lets Ray Serve proxies quiesce; these heads serve nothing)
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        "PYTHONUNBUFFERED": "1",  # `ray start` output reaches its log file as it is written
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",  # the head's `python` has the project, as in the image
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": PLANTED_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_endpoint,
        "RAY_metrics_report_interval_ms": "500",  # metrics reach the exporter within a second
    }
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block", "--port", str(gcs), "--metrics-export-port", str(metrics),
        "--node-ip-address", "127.0.0.1",
        *(["--include-dashboard=false"] if default_temp else
          ["--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard)]),
        "--num-cpus", "4", "--num-gpus", "0", "--disable-usage-stats", *([] if default_temp else ["--temp-dir", str(temp)]),
        # the suite's own Ray (and the other head) hold the default agent and metrics ports on this machine
        *[arg for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                           "--runtime-env-agent-port", "--ray-client-server-port")
          for arg in (flag, str(_free_port()))],
    ]  # fmt: skip
    with open(temp / "ray-start.log", "wb") as log:
        process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    head = Head(f"http://127.0.0.1:{dashboard}", process, temp, {"RAY_AUTH_MODE": auth_mode}, f"127.0.0.1:{gcs}",
                metrics)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        up = (
            (lambda: b"block forever" in (temp / "ray-start.log").read_bytes())
            if default_temp
            else (lambda: _up(head))
        )
        while not up():
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"the head did not come up\n{head.diagnose()}")
            time.sleep(1)
        yield head
    finally:
        process.terminate()
        process.wait(timeout=60)
        shutil.rmtree(temp, ignore_errors=True)
        current = Path(
            "/tmp/ray/ray_current_cluster"
        )  # a plain head leaves its address there: not ours to keep
        if default_temp and current.exists() and head.gcs in current.read_text():
            current.unlink()


@pytest.fixture(scope="module")
def token_head(s3_endpoint):
    """A head with token authentication; clients send the token from ~/.ray/auth_token."""
    with _head(s3_endpoint, "token") as head:
        yield head


@pytest.fixture(scope="module")
def open_head(s3_endpoint):
    """A head without authentication, as many private clusters run."""
    with _head(s3_endpoint, "disabled") as head:
        yield head


def _python(head: Head, code: str) -> str:
    """Run `code` in a fresh process with the head's client auth mode (this process, which already runs Ray,
    cannot switch modes); return its stdout."""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **head.client_env})  # fmt: skip
    if res.returncode:
        raise RuntimeError(res.stderr[-2000:])
    return res.stdout


def _jobs_api(head: Head, expression: str):
    """Evaluate `expression` on a JobSubmissionClient `c` of the head."""
    out = _python(head, (
        "import json; from ray.job_submission import JobSubmissionClient; "
        f"c = JobSubmissionClient({head.address!r}); print(json.dumps({expression}, default=str))"
    ))  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


def _write_spec(folder: Path, **fields) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    spec = {"kind": "score", "actors": 1, "shard_rows": 8, **fields}
    path = folder / f"{fields['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _submit(head: Head, spec: Path, cwd: Path, *extra, env=None):
    cwd.mkdir(parents=True, exist_ok=True)
    cmd = [str(BIN / "fengshen-batch"), "submit", str(spec), "--address", head.address, *extra]
    run_env = {**os.environ, **head.client_env, **DATE, **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=run_env, cwd=cwd)


def _expect(res, code: int, head: Head) -> None:
    assert res.returncode == code, f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}\n{head.diagnose()}"


# --- without a cluster: what submit builds, and what it refuses before any connection ---------------------


def test_submission_ids_and_spec_checks(tmp_path, monkeypatch):
    from fengshen_batch.spec import SpecError
    from fengshen_batch.submission.submit import submit

    monkeypatch.setenv("FENGSHEN_RUN_DATE", "2026-11-21")
    assert default_submission_id("nightly-score") == "nightly-score-20261121"
    with pytest.raises(SpecError, match="no `name`"):
        default_submission_id(None)
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"kind": "score", "name": "x", "model": "m", "input": "s3://b/i",
                                    "output": "s3://b/o",
                                    "runtime_env": {"env_vars": {"AWS_SECRET_ACCESS_KEY": "k"}}}))  # fmt: skip
    with pytest.raises(SpecError, match="look like credentials"):
        submit(str(spec), "http://127.0.0.1:9")


def _inline_spec(entrypoint: str) -> dict:
    head, _, rest = entrypoint.partition("\n")
    assert head == "python -m fengshen_batch run /dev/stdin <<'FENGSHEN_SPEC'", head
    return yaml.safe_load(rest.rsplit("\n", 1)[0])


def test_plan_resolves_local_paths_and_ships_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("FENGSHEN_RUN_DATE", "2026-11-21")
    folder = tmp_path.resolve() / "specs"
    (folder / "models" / "tiny").mkdir(parents=True)
    local = "http://127.0.0.1:8265"
    spec = _write_spec(folder, name="p", model="models/tiny", input="in/", output="out/{date}/",
                       runtime_env={"pip": ["pyarrow"], "env_vars": {"X": "1"}})  # fmt: skip
    job = plan(str(spec), local, package="pip")
    fields = _inline_spec(job.entrypoint)
    assert fields["model"] == str(folder / "models" / "tiny")
    assert fields["input"] == f"{folder}/in/" and fields["output"] == f"{folder}/out/2026-11-21/"
    assert job.runtime_env == {"pip": ["pyarrow", f"fengshen-batch=={local_version()}"],
                               "env_vars": {"FENGSHEN_RUN_DATE": "2026-11-21", "X": "1"}}  # fmt: skip
    assert job.submission_id == "p-20261121"

    # the inline spec survives the shell untouched: quotes, $, backquotes, non-ASCII
    odd = _write_spec(folder, name="o", kind="generate", model="s3://b/m/", input="s3://b/i", output="s3://b/o",
                      stop=["$HOME `id` 'x' \"y\"", "\n\nFENGSHEN_SPEC\n", "结束"])  # fmt: skip
    entrypoint = plan(str(odd), local).entrypoint
    shown = subprocess.run(["sh", "-c", entrypoint.replace("python -m fengshen_batch run /dev/stdin", "cat", 1)],
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert yaml.safe_load(shown)["stop"] == ["$HOME `id` 'x' \"y\"", "\n\nFENGSHEN_SPEC\n", "结束"]

    # a hub id stays a hub id (local head or remote), unless such a directory lies beside the spec
    for address in (local, "http://[::1]:8265", "localhost:8265", "http://10.1.2.3:8265"):
        hub = _write_spec(folder, name="h", model="IDEA-CCNL/Wenzhong-GPT2-3.5B", input="s3://b/in/",
                          output="file:///mnt/shared/out/", runtime_env={})  # fmt: skip
        fields = _inline_spec(plan(str(hub), address).entrypoint)
        assert fields["model"] == "IDEA-CCNL/Wenzhong-GPT2-3.5B" and fields["input"] == "s3://b/in/"
        assert fields["output"] == "file:///mnt/shared/out/"
    (folder / "IDEA-CCNL" / "Wenzhong-GPT2-3.5B").mkdir(parents=True)
    fields = _inline_spec(plan(str(hub), local).entrypoint)
    assert fields["model"] == str(folder / "IDEA-CCNL" / "Wenzhong-GPT2-3.5B")
    with pytest.raises(SubmitError, match=r"local path \(model: IDEA-CCNL/Wenzhong-GPT2-3.5B\)"):
        plan(str(hub), "http://10.1.2.3:8265")

    # the package: the cluster's image adds nothing; py-modules ships this machine's copy
    image = plan(str(hub), local)
    assert image.runtime_env == {"env_vars": {"FENGSHEN_RUN_DATE": "2026-11-21"}}
    modules = plan(str(hub), local, package="py-modules")
    assert modules.runtime_env["py_modules"] == [str(Path(sys.modules["fengshen_batch"].__file__).parent)]
    assert "working_dir" not in modules.runtime_env and modules.runtime_env["excludes"]
    wd = plan(str(hub), local, working_dir=str(tmp_path))
    assert wd.runtime_env["working_dir"] == str(tmp_path.resolve())

    # conflicting ways of shipping the package are refused clearly
    twice = _write_spec(folder, name="t", model="m/m", input="s3://b/i", output="s3://b/o",
                        runtime_env={"pip": ["fengshen-batch==0.0.9"]})  # fmt: skip
    with pytest.raises(SubmitError, match=r"runtime_env.pip already ships fengshen-batch"):
        plan(str(twice), local)
    conda = _write_spec(folder, name="c", model="m/m", input="s3://b/i", output="s3://b/o",
                        runtime_env={"conda": {"dependencies": ["pip"]}})  # fmt: skip
    with pytest.raises(
        SubmitError, match=r"--package pip cannot be combined with the spec's runtime_env.conda"
    ):
        plan(str(conda), local, package="pip")
    wd_spec = _write_spec(folder, name="w", model="m/m", input="s3://b/i", output="s3://b/o",
                          runtime_env={"working_dir": "code"})  # fmt: skip
    assert plan(str(wd_spec), local).runtime_env["working_dir"] == str(folder / "code")
    with pytest.raises(SubmitError, match="differ: give one"):
        plan(str(wd_spec), local, working_dir=str(tmp_path))


def test_remote_cluster_refuses_local_paths_before_connecting(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from fengshen_batch.cli import main
    from fengshen_batch.submission import submit as jobs

    def no_network(*args, **kwargs):
        raise AssertionError("submit opened a connection before refusing the spec")

    monkeypatch.setattr(jobs, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.chdir(tmp_path)
    spec = _write_spec(tmp_path / "specs", name="remote", model="IDEA-CCNL/Wenzhong-GPT2-3.5B",
                       input="data/in/", output="s3://b/out/{date}/")  # fmt: skip
    res = CliRunner().invoke(main, ["submit", str(spec), "--address", "http://10.1.2.3:8265"], env=DATE)
    assert res.exit_code == 2, res.output
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.output
    assert "(input: data/in/)" in res.stderr and "model" not in res.stderr
    assert "remote" in res.stderr and "s3://" in res.stderr and "cannot see this machine's disk" in res.stderr


# --- against the token-authenticated head -------------------------------------------------------------------


def test_submit_from_anywhere_runs_once_and_reports_failures(
    tmp_path, token_head, s3_options, s3_endpoint, tiny_model_dir
):
    head = token_head
    make_bucket(s3_options, "submit")
    fs = s3fs.S3FileSystem(**s3_options)
    rows = write_texts(tmp_path / "local-in", files=(10, 10))
    for f in (tmp_path / "local-in").iterdir():
        fs.put(str(f), f"submit/in/{f.name}")
    folder = tmp_path / "specs"
    spec = _write_spec(folder, name="nightly-test", model=str(tiny_model_dir), input="s3://submit/in/",
                       output="s3://submit/out/{date}/", storage={"endpoint_url": s3_endpoint})  # fmt: skip
    upload = tmp_path / "upload"  # --working-dir: uploaded, though the spec is not in it
    upload.mkdir()
    (upload / "notes.txt").write_text("uploaded\n")

    start = time.monotonic()
    res = _submit(head, spec, tmp_path / "cwd", "--wait", "--working-dir", str(upload))
    took = time.monotonic() - start
    _expect(res, 0, head)
    print(f"submit (image probe) --wait to SUCCEEDED: {took:.1f}s")
    sid = "nightly-test-20261121"
    assert f"package: fengshen-batch {local_version()} from the cluster image" in res.stdout
    assert f"{sid}: SUCCEEDED" in res.stdout
    fs.invalidate_cache()
    out = "submit/out/2026-11-21"
    assert fs.exists(f"{out}/_SUCCESS")
    manifest = json.loads(fs.cat_file(f"{out}/manifest.json"))
    assert manifest["counts"]["input_rows"] == len(rows) == manifest["counts"]["result_rows"]
    first_manifest = fs.info(f"{out}/manifest.json")["LastModified"]

    # the same nightly job again: found before any probe or submission, reported plainly, not run again
    again = _submit(head, spec, tmp_path / "cwd", "--wait")
    _expect(again, 0, head)
    assert "already submitted" in again.stdout and "Traceback" not in again.stdout + again.stderr
    assert "package:" not in again.stdout  # no probe
    ids = _jobs_api(head, "[j.submission_id for j in c.list_jobs()]")
    assert ids.count(sid) == 1 and not [i for i in ids if i.startswith("fengshen-probe-")]  # probes deleted
    fs.invalidate_cache()
    assert fs.info(f"{out}/manifest.json")["LastModified"] == first_manifest
    info = _jobs_api(head, f"c.get_job_info({sid!r}).dict()")
    assert info["runtime_env"]["env_vars"] == DATE  # the driver's {date}
    assert info["runtime_env"]["working_dir"].startswith("gcs://")
    assert "run /dev/stdin" in info["entrypoint"] and "s3://submit/out/2026-11-21/" in info["entrypoint"]
    assert PLANTED_SECRET not in json.dumps(info)
    assert PLANTED_SECRET not in _jobs_api(head, f"c.get_job_logs({sid!r})")

    # a job that fails on the cluster: --wait exits non-zero with the job's error
    bad = _write_spec(folder, name="broken-test", model="/nonexistent/model", input="s3://submit/in/",
                      output="s3://submit/bad/", storage={"endpoint_url": s3_endpoint})  # fmt: skip
    res = _submit(head, bad, tmp_path / "cwd", "--wait", "--package", "py-modules")
    _expect(res, 1, head)
    assert "broken-test-20261121: FAILED" in res.stdout and "model not found" in res.stdout


def test_auth_failure_says_what_to_set(tmp_path, token_head):
    spec = _write_spec(tmp_path, name="auth-test", model="m/m", input="s3://b/i", output="s3://b/o")
    res = _submit(token_head, spec, tmp_path / "cwd", env={"RAY_AUTH_TOKEN": "not-the-token"})
    _expect(res, 2, token_head)
    assert "token authentication failed" in res.stderr and "RAY_AUTH_TOKEN" in res.stderr
    assert "Traceback" not in res.stderr


# --- against the head without authentication --------------------------------------------------------------


def test_local_paths_resolve_against_the_spec_folder(tmp_path, open_head, tiny_model_dir):
    """Input, output and model relative to the spec, submitted from elsewhere; the package as py_modules."""
    head = open_head
    folder = tmp_path / "specs"
    rows = write_texts(folder / "in", files=(6, 5))
    (folder / "tiny").symlink_to(tiny_model_dir)
    spec = _write_spec(folder, name="local-test", model="tiny", input="in/", output="out/{date}/")
    res = _submit(head, spec, tmp_path / "cwd", "--wait", "--package", "py-modules")
    _expect(res, 0, head)
    assert "local-test-20261121: SUCCEEDED" in res.stdout
    assert f"package: fengshen-batch {local_version()} from this machine (py_modules" in res.stdout
    out = folder / "out" / "2026-11-21"
    assert (out / "_SUCCESS").exists() and not (tmp_path / "cwd" / "out").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["input_rows"] == len(rows) == manifest["counts"]["result_rows"]
    info = _jobs_api(head, "c.get_job_info('local-test-20261121').dict()")
    [module] = info["runtime_env"]["py_modules"]
    assert module.startswith("gcs://") and "working_dir" not in info["runtime_env"]


def test_image_probe_failure_is_one_clear_line(open_head):
    code = (
        "from fengshen_batch.submission.probe import probe_image\nfrom fengshen_batch.errors import SubmitError\n"
        "from fengshen_batch.submission.client import connect\n"
        f"c = connect({open_head.address!r})\n"
        "try:\n"
        f"    print('version', probe_image(c, {open_head.address!r}, {DATE!r}, module='fengshen_batch_absent'))\n"
        "except SubmitError as e:\n"
        "    print('error', e)\n"
    )
    out = _python(open_head, code).strip().splitlines()[-1]
    assert out.startswith("error fengshen-batch is not installed in the cluster's image"), out
    assert "No module named 'fengshen_batch_absent'" in out and "--package py-modules" in out
    # the package imports, but what the job imports next is missing: named, all of it, before any job runs
    code = code.replace(
        "module='fengshen_batch_absent'", "needs=('fengshen_batch', 'pyarrow_absent', 'torch_absent')"
    )
    out = _python(open_head, code).strip().splitlines()[-1]
    assert out.startswith(
        "error the cluster's python lacks pyarrow_absent, torch_absent, which the job imports"
    ), out
    ids = _jobs_api(open_head, "[j.submission_id for j in c.list_jobs()]")
    assert not [i for i in ids if i.startswith("fengshen-probe-")]


def test_python_submit_of_a_spec_object_with_paths_relative_to_the_cwd(tmp_path, open_head, tiny_model_dir):
    """`fengshen_batch.submit` from a script: a spec object (no YAML file), local paths relative to the
    current directory, waited for; a second submit of the same name finds it and does not run it again."""
    folder = tmp_path / "work"
    rows = write_texts(folder / "in", files=(4, 3))
    (folder / "tiny").symlink_to(tiny_model_dir)
    code = (
        "import os, fengshen_batch as fb\n"
        f"os.environ.update({DATE!r})\n"
        f"os.chdir({str(folder)!r})\n"
        "job = fb.ScoreJob(name='api-test', model='tiny', input='in/', output='out/')\n"
        f"first = fb.submit(job, {open_head.address!r}, wait=True, package='py-modules', progress=None)\n"
        f"again = fb.submit(job, {open_head.address!r}, package='py-modules', progress=None)\n"
        "print('result', first.submission_id, first.created, first.status, again.created)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=400,
                         env={**os.environ, **open_head.client_env})  # fmt: skip
    assert res.returncode == 0, f"{res.stderr[-3000:]}\n{open_head.diagnose()}"
    assert res.stdout.strip().splitlines()[-1] == "result api-test-20261121 True SUCCEEDED False", res.stdout
    manifest = json.loads((folder / "out" / "manifest.json").read_text())
    assert manifest["counts"]["input_rows"] == len(rows) == manifest["counts"]["result_rows"]


def test_a_running_job_counts_into_ray_metrics(tmp_path, open_head, tiny_model_dir):
    """The actors' counters reach Ray's own Prometheus export (what the dashboard and Grafana read)."""
    import urllib.request

    write_texts(tmp_path / "in", files=(7, 6))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    res = subprocess.run(
        [str(BIN / "fengshen-batch"), "score", "--model", str(tiny_model_dir), "--input", str(tmp_path / "in"),
         "--output", str(tmp_path / "out"), "--address", open_head.gcs, "--name", "metrics-test"],
        capture_output=True, text=True, timeout=300, env={**env, **open_head.client_env},
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:] + open_head.diagnose()
    wanted = {
        "rows": 13.0,
        "tokens": float(json.loads((tmp_path / "out" / "manifest.json").read_text())["counts"]["tokens"]),
    }
    found: dict[str, float] = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and found != wanted:
        text = (
            urllib.request.urlopen(f"http://127.0.0.1:{open_head.metrics}/metrics", timeout=10)
            .read()
            .decode()
        )
        for name in wanted:
            values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                      if line.startswith(f"ray_fengshen_{name}_total{{") and 'job="metrics-test"' in line]  # fmt: skip
            if values:
                found[name] = sum(values)
        time.sleep(1)
    assert found == wanted, text[-3000:]


def test_a_job_without_an_address_starts_its_own_ray_beside_a_running_head(
    tmp_path, s3_endpoint, tiny_model_dir
):
    """Issue 33: with a plain `ray start --head` on this machine, a job given no address (and no RAY_ADDRESS)
    runs on a Ray of its own, as the README promises; before, it joined that head and died on
    "When connecting to an existing cluster, num_cpus and num_gpus must not be provided" (exit 1)."""
    write_texts(tmp_path / "in", files=(3,))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with _head(s3_endpoint, "disabled", default_temp=True):
        res = subprocess.run([sys.executable, "-m", "fengshen_batch", "score", "--model", str(tiny_model_dir),
                              "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")],
                             env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "starting a local Ray" in res.stdout and "existing cluster" not in res.stdout + res.stderr
    assert (tmp_path / "out" / "_SUCCESS").exists()
