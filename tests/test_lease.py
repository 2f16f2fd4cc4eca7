"""Issue 32, case 3: one run at a time writes an output (job/lease.py). A second run is refused naming the
holder, a stale lease (a dead driver) is taken over, two runs started together leave exactly one complete
output, and a run that lost its lease commits nothing more: on a local disk and on S3 (moto's server)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
from click.testing import CliRunner

from fengshen_batch.cli import main
from fengshen_batch.errors import JobError
from fengshen_batch.io.outputs import OutputStore
from fengshen_batch.io.storage import StorageSpec
from fengshen_batch.job.lease import LEASE, LeaseLost, OutputLease
from tests.helpers import make_bucket, write_texts


def _score(model, inp, out):
    return CliRunner().invoke(
        main, ["score", "--model", str(model), "--input", str(inp), "--output", str(out)]
    )


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    """An output URL on a local disk or in moto's S3 (a fresh bucket prefix per test)."""
    if request.param == "local":
        return str(tmp_path / "out")
    s3_options = request.getfixturevalue("s3_options")
    make_bucket(s3_options, "leases")
    return f"s3://leases/{tmp_path.name}/out"


@pytest.mark.usefixtures("ray_cluster")
def test_a_second_run_is_refused_naming_the_holder_until_it_lets_go(tmp_path, tiny_model_dir, output):
    write_texts(tmp_path / "in", files=(4,))
    store = OutputStore(output, StorageSpec())
    held = OutputLease(store, "nightly").acquire()  # another run, alive on this host
    try:
        res = _score(tiny_model_dir, tmp_path / "in", output)
        assert res.exit_code == 2, res.output
        assert f"is being written by another run (run {held.run_id}, job 'nightly'" in res.output
        assert not store.fs.exists(store.path_to("_SUCCESS"))
    finally:
        held.release()
    res = _score(tiny_model_dir, tmp_path / "in", output)
    assert res.exit_code == 0, res.output
    assert store.fs.exists(store.path_to("_SUCCESS")) and not store.fs.exists(store.path_to(LEASE))


@pytest.mark.usefixtures("ray_cluster")
def test_a_stale_lease_is_taken_over(tmp_path, tiny_model_dir, output):
    """A lease renewed long ago on another machine, and one whose driver on this host is gone."""
    write_texts(tmp_path / "in", files=(3,))
    store = OutputStore(output, StorageSpec())
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = [
        {"run_id": "old-run", "job": "x", "host": "another-host", "pid": 1, "renewed": time.time() - 3600},
        {"run_id": "killed-run", "job": "x", "host": OutputLease(store, "x").body["host"],
         "pid": int(dead.stdout), "renewed": time.time()},
    ]  # fmt: skip
    # one case per backend keeps the suite short: a stale lease on S3, a dead driver's on a local disk
    for body in stale[:1] if output.startswith("s3://") else stale[1:]:
        store.fs.makedirs(store.path, exist_ok=True)
        store.fs.pipe_file(store.path_to(LEASE), json.dumps(body).encode())
        res = _score(tiny_model_dir, tmp_path / "in", output)
        assert res.exit_code == 0, res.output
        assert not store.fs.exists(store.path_to(LEASE))


@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.parametrize("output", ["s3"], indirect=True)  # the conditional writes that matter most
def test_two_runs_started_together_leave_exactly_one_complete_output(tmp_path, tiny_model_dir, output):
    """Two jobs of different configurations (another stride) started at once into one output: one finishes,
    the other is refused by the lease, and the output is the winner's whole."""
    from fengshen_batch.job.run import run_job
    from fengshen_batch.spec import build_spec

    write_texts(tmp_path / "in", files=(5, 5))
    specs = [build_spec({"kind": "score", "model": str(tiny_model_dir), "input": str(tmp_path / "in"),
                         "output": output, "stride": stride, "shard_rows": 2}) for stride in (None, 16)]  # fmt: skip
    start, outcome = threading.Barrier(2), [None, None]

    def run(i):
        start.wait()
        try:
            outcome[i] = run_job(specs[i], progress=lambda _: None, live=False)
        except JobError as e:
            outcome[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    won = [i for i, o in enumerate(outcome) if isinstance(o, dict)]
    lost = [o for o in outcome if isinstance(o, JobError)]
    assert len(won) == 1 and len(lost) == 1, outcome
    assert "is being written by another run" in str(lost[0])
    store = OutputStore(output, StorageSpec())
    manifest = json.loads(store.fs.cat_file(store.path_to("manifest.json")))
    assert manifest["spec"]["stride"] == specs[won[0]].stride and manifest["counts"]["input_rows"] == 10
    assert store.fs.exists(store.path_to("_SUCCESS")) and not store.fs.exists(store.path_to(LEASE))


def test_a_run_that_lost_its_lease_commits_nothing_more(output, request):
    if output.startswith("s3://"):
        request.getfixturevalue("s3_options")
    store = OutputStore(output, StorageSpec())
    ours = OutputLease(store, "a", renew_s=0.05).acquire()
    try:
        ours.check()
        # someone deletes the lease and another run takes the output
        store.fs.rm_file(store.path_to(LEASE))
        theirs = OutputLease(store, "b").acquire()
        with pytest.raises(LeaseLost, match=f"run {theirs.run_id}"):
            ours.check()
        time.sleep(0.2)  # our renewals find someone else's copy and do not overwrite it
        assert json.loads(store.fs.cat_file(store.path_to(LEASE)))["run_id"] == theirs.run_id
        ours.release()  # releasing a lost lease leaves the holder's alone
        assert store.fs.exists(store.path_to(LEASE))
        theirs.release()
        assert not store.fs.exists(store.path_to(LEASE))
    finally:
        ours.release()
