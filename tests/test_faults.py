"""Exactly-once under faults: a killed actor, a killed driver (rerun resumes), a lost node, 503s from storage,
a row the engine cannot process, and --overwrite that keeps the old output until the new one exists."""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from fengshen_batch.cli import main
from fengshen_batch.job.run import run_job
from fengshen_batch.kinds import process as rows
from fengshen_batch.kinds.generation import generate
from fengshen_batch.kinds.score import KIND as SCORE
from fengshen_batch.kinds.scoring import score_texts
from fengshen_batch.spec import build_spec
from tests.helpers import FaultyS3Proxy, make_bucket, model_actor_pids, wait_for, write_texts

ROOT = Path(__file__).resolve().parent.parent


def ids_in(out: Path, folder: str) -> list[str]:
    path = out / folder
    return pq.read_table(path).column("id").to_pylist() if path.exists() else []


def assert_exactly_once(out: Path, rows: dict, samples: int = 1) -> None:
    """Every input row in data/ (once per sample) or in errors/ (once), nothing else."""
    seen = collections.Counter(ids_in(out, "data"))
    errors = collections.Counter(ids_in(out, "errors"))
    assert set(seen) | set(errors) == set(rows), "rows lost or invented"
    assert all(n == samples for n in seen.values()), "rows duplicated"
    assert all(n == 1 for n in errors.values()) and not set(seen) & set(errors)
    assert (out / "_SUCCESS").exists()


def markers(out: Path) -> int:
    return len(list((out / "_markers").glob("*.json"))) if (out / "_markers").exists() else 0


@pytest.mark.usefixtures("ray_cluster")
def test_actor_killed_mid_job_is_restarted_and_the_batch_retried(tmp_path, replica):
    rows = write_texts(tmp_path / "in", files=(30, 30), repeat_every=2)
    out = tmp_path / "out"
    spec = build_spec({
        "kind": "generate", "model": replica.source, "input": str(tmp_path / "in"), "output": str(out),
        "prompt_column": "text", "actors": 2, "max_new_tokens": 24, "shard_rows": 4, "batch_size": 4, "seed": 3,
    })  # fmt: skip
    killed, at = [], []

    def killer():
        if wait_for(lambda: markers(out) >= 1, timeout=180):
            at.append(markers(out))
            for pid in model_actor_pids():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    thread = threading.Thread(target=killer)
    thread.start()
    manifest = run_job(spec, progress=lambda _: None)
    thread.join()
    assert killed and at[0] < manifest["shards"], "the actors were not killed mid-job"
    assert_exactly_once(out, rows)
    # the restarted actors' samples are the very samples of an undisturbed run
    ids = sorted(rows)
    expected = generate(replica, [rows[i] for i in ids], ids, spec.params())
    got = {r["id"]: r["generation"] for r in pq.read_table(out / "data").to_pylist()}
    assert [got[i] for i in ids] == [e[0].generation for e in expected]


@pytest.mark.usefixtures("ray_cluster")
def test_driver_killed_at_random_points_then_rerun_resumes(tmp_path, replica, ray_cluster):
    # ~20 shards a second once actors run: enough shards, and kills soon after progress, land mid-job
    rows = write_texts(tmp_path / "in", files=(64, 64, 64), repeat_every=4)
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "fengshen_batch", "generate", "--model", replica.source,
        "--input", str(tmp_path / "in"), "--output", str(out), "--prompt-column", "text",
        "--max-new-tokens", "24", "--shard-rows", "4", "--batch-size", "4", "--address", ray_cluster,
    ]  # fmt: skip
    rng = random.Random(20261122)
    kills = []
    for _ in range(3):
        before = markers(out)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert wait_for(lambda b=before, p=proc: markers(out) > b or p.poll() is not None, timeout=180)
            threading.Event().wait(rng.uniform(0.0, 0.3))
            proc.kill()
        finally:
            proc.wait()
        if not (out / "_SUCCESS").exists():
            kills.append(markers(out))
    assert len(kills) >= 2, f"driver was not killed mid-job often enough: {kills}"
    final = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    print(
        f"driver killed with {kills} of {manifest['shards']} shards committed; resumed {manifest['resumed_shards']}"
    )
    assert manifest["resumed_shards"] >= kills[-1] > 0
    assert_exactly_once(out, rows)


def test_a_row_the_engine_cannot_process_becomes_an_error_row(replica, monkeypatch):
    real = SCORE.run

    def poisoned(replicas, spec, texts, ids, budget, usage=None):
        if "POISON" in texts:
            raise ValueError("cannot process this row")
        return real(replicas, spec, texts, ids, budget, usage)

    monkeypatch.setattr(SCORE, "run", poisoned)
    spec = build_spec({"kind": "score", "model": "m", "input": "i", "output": "o"})
    table = pa.table(
        {"id": ["a", "b", "c"], "text": ["北京", "POISON", "ok"], "_shard": [0] * 3, "_row": [0, 1, 2]}
    )
    out, _ = rows.process_table(rows.Replicas(replica), spec, table, "id", 1000)
    assert out.column("error_kind").to_pylist() == [None, "engine_error", None]
    assert "cannot process this row" in out.column("error_message")[1].as_py()
    expected, _ = score_texts(replica, ["北京", "ok"])
    assert out.column("nll_sum").to_pylist()[0] == pytest.approx(expected[0].nll_sum)
    assert out.column("nll_sum").to_pylist()[2] == pytest.approx(expected[1].nll_sum)


@pytest.mark.usefixtures("ray_cluster")
def test_transient_503_slowdown_from_storage_is_retried(
    tmp_path, replica, tiny_model_dir, s3_endpoint, s3_options
):
    import s3fs

    make_bucket(s3_options, "flaky")
    fs = s3fs.S3FileSystem(**s3_options)
    for f in tiny_model_dir.iterdir():
        fs.put(str(f), f"flaky/model/{f.name}")
    rows = write_texts(tmp_path / "in", files=(9, 8))
    for f in (tmp_path / "in").iterdir():
        fs.put(str(f), f"flaky/in/{f.name}")
    proxy = FaultyS3Proxy(s3_endpoint, every=4)
    try:
        spec = build_spec({
            "kind": "score", "model": "s3://flaky/model/", "input": "s3://flaky/in/", "output": "s3://flaky/out/",
            "actors": 1, "shard_rows": 3, "storage": {"endpoint_url": proxy.url},
        })  # fmt: skip
        run_job(spec, progress=lambda _: None)
    finally:
        proxy.stop()
    assert proxy.injected >= 5, proxy.injected
    fs.invalidate_cache()
    local = tmp_path / "out"
    fs.get("flaky/out/", str(local), recursive=True)
    assert_exactly_once(local, rows)


@pytest.mark.usefixtures("ray_cluster")
def test_overwrite_keeps_the_old_output_until_the_new_one_exists(tmp_path, replica, ray_cluster):
    rows = write_texts(tmp_path / "in", files=(40, 40), repeat_every=4)
    out = tmp_path / "out"
    base = ["score", "--model", replica.source, "--input", str(tmp_path / "in"), "--output", str(out),
            "--shard-rows", "4", "--batch-size", "4", "--address", ray_cluster]  # fmt: skip
    runner = CliRunner()
    assert runner.invoke(main, base).exit_code == 0
    old = pq.read_table(out / "data").sort_by("id")
    changed = [*base, "--stride", "8"]
    res = runner.invoke(main, changed)  # a different configuration is refused, nothing touched
    assert res.exit_code == 2 and "different configuration (stride null there, 8 here)" in res.output
    # kill an --overwrite run mid-way: the old output is still published and intact
    proc = subprocess.Popen([sys.executable, "-m", "fengshen_batch", *changed, "--overwrite"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        assert wait_for(lambda: markers(out / "_overwrite") >= 1, timeout=180)
        proc.kill()
    finally:
        proc.wait()
    assert (out / "_SUCCESS").exists()
    assert pq.read_table(out / "data").sort_by("id").equals(old)
    # rerun the overwrite: it resumes, then replaces the old output
    res = subprocess.run([sys.executable, "-m", "fengshen_batch", *changed, "--overwrite"], capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert not (out / "_overwrite").exists()
    assert json.loads((out / "manifest.json").read_text())["spec"]["stride"] == 8
    assert_exactly_once(out, rows)
    new = pq.read_table(out / "data").sort_by("id")
    assert new.column("nll_sum").to_pylist() != old.column("nll_sum").to_pylist()


def test_lost_worker_node_mid_job(tmp_path, tiny_model_dir):
    """Head + 2 worker nodes with 1 GPU each: one actor per node; one node dies mid-job; all rows once."""
    rows = write_texts(tmp_path / "in", files=(30, 30, 30))
    out = tmp_path / "out"
    spec = {
        "kind": "generate", "model": str(tiny_model_dir), "input": str(tmp_path / "in"), "output": str(out),
        "prompt_column": "text", "actors": "1,2", "gpus_per_actor": 1, "max_new_tokens": 24, "shard_rows": 4,
        "batch_size": 4,
    }  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "multinode_job.py"), json.dumps(spec), "--lose-node"],
        capture_output=True, text=True, timeout=400, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("REPORT ")]  # Ray may print around it
    report = json.loads(line.removeprefix("REPORT "))
    assert len(report["nodes_seen"]) == 2, report  # an actor on each GPU node
    assert report["gpus_per_actor"] == 1.0
    assert report["lost_at_markers"] < report["shards"], report
    assert report["counts"]["input_rows"] == 90 == report["counts"]["result_rows"]
    assert_exactly_once(out, rows)


def test_out_of_memory_at_the_smallest_batch_is_retried_then_that_row_goes_to_errors(replica, monkeypatch):
    """Issue 32, case 7: a transient out-of-memory on one row alone is retried and scores; a row that runs out
    of memory alone every time goes to errors/ as out_of_memory while the others score (before, the actor's
    call raised and the whole job failed, on every rerun)."""
    from fengshen_batch.kinds import scoring

    real, seen = scoring.window_logprobs, []

    def flaky(rep, windows, per_token=False):
        longest = max(len(s) for s, _ in windows)
        seen.append(longest)
        if longest > 40 or (longest > 12 and seen.count(longest) == 1):  # too long ever; once, transiently
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(rep, windows, per_token)

    texts = ["北京", "Diabetics should not eat sugar.", "word " * 60, "ok"]
    expected, _ = score_texts(replica, texts)
    monkeypatch.setattr(scoring, "window_logprobs", flaky)
    spec = build_spec({"kind": "score", "model": "m", "input": "i", "output": "o"})
    table = pa.table({"id": list("abcd"), "text": texts, "_shard": [0] * 4, "_row": [0, 1, 2, 3]})
    out, _ = rows.process_table(rows.Replicas(replica), spec, table, "id", 1000)
    assert out.column("error_kind").to_pylist() == [None, None, "out_of_memory", None]
    assert "out of memory on this row alone" in out.column("error_message")[2].as_py()
    assert any(12 < n <= 40 and seen.count(n) == 2 for n in seen)  # row b: failed once, then retried
    got = out.column("nll_sum").to_pylist()
    for i in (0, 1, 3):
        assert got[i] == pytest.approx(expected[i].nll_sum, rel=1e-5)


@pytest.mark.usefixtures("ray_cluster")
def test_a_driver_killed_during_the_overwrite_swap_leaves_no_published_mix(tmp_path, replica, monkeypatch):
    """Issue 32: the swap of an --overwrite run interrupted after some files were copied in: the output is
    not published (no _SUCCESS over a mix of old and new files), and rerunning the same command finishes
    the swap from the complete staging copy: the new output, every row exactly once."""
    from fsspec.implementations.local import LocalFileSystem

    rows = write_texts(tmp_path / "in", files=(4, 4))
    out = tmp_path / "out"
    base = ["score", "--model", replica.source, "--input", str(tmp_path / "in"), "--output", str(out),
            "--shard-rows", "4"]  # fmt: skip
    runner = CliRunner()
    assert runner.invoke(main, base).exit_code == 0
    changed = [*base, "--stride", "8", "--overwrite"]
    real, copies = LocalFileSystem.copy, []

    def dies_mid_swap(self, *args, **kwargs):
        copies.append(args)
        if len(copies) == 3:  # the first data files are in, the rest and the markers are not
            raise KeyboardInterrupt  # the driver stops here, as under SIGKILL
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "copy", dies_mid_swap)
    assert runner.invoke(main, changed).exit_code != 0 and len(copies) == 3
    assert not (out / "_SUCCESS").exists() and not (out / "manifest.json").exists()
    monkeypatch.setattr(LocalFileSystem, "copy", real)
    res = runner.invoke(main, changed)
    assert res.exit_code == 0, res.output
    assert json.loads((out / "manifest.json").read_text())["spec"]["stride"] == 8
    assert not (out / "_overwrite").exists()
    assert_exactly_once(out, rows)
