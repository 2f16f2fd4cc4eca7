"""Ray Data processors inside a pipeline the user built: the same numbers as the job on the same rows and ids,
the same result column types, bad rows in error columns, and clear errors for what cannot run."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import fengshen_batch as fb
from fengshen_batch.tiny_model import SAMPLE_LINES

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _rows():
    texts = [line * (1 + i % 3) for i, line in enumerate(SAMPLE_LINES)] + ["", "短"]
    return [{"id": f"r{i}", "text": t, "keep": i % 4 != 3} for i, t in enumerate(texts)]


def _sorted(table: pa.Table, *keys) -> list[dict]:
    return table.sort_by([(k, "ascending") for k in keys]).to_pylist()


def test_score_inside_a_users_pipeline_equals_the_job(tmp_path, replica):
    import ray

    rows = _rows()
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    kept = [r for r in rows if r["keep"]]
    (tmp_path / "kept").mkdir()
    pq.write_table(pa.Table.from_pylist(kept), tmp_path / "kept" / "k.parquet")
    job = fb.run(fb.ScoreJob(model=str(replica.source), input=str(tmp_path / "kept"),
                             output=str(tmp_path / "job"), token_logprobs=True), progress=None)  # fmt: skip

    ds = ray.data.read_json(str(tmp_path / "in.jsonl")).filter(lambda r: r["keep"])
    ds = fb.score(ds, model=str(replica.source), token_logprobs=True, batch_size=5)
    ds.write_parquet(str(tmp_path / "piped"))
    piped = pq.read_table(tmp_path / "piped")

    data = pq.read_table(tmp_path / "job" / "data")
    results = ["nll_sum", "token_count", "ppl", "byte_count", "bits_per_byte", "token_ids", "token_logprobs"]
    for name in results:  # the job's result types
        assert piped.schema.field(name).type == data.schema.field(name).type, name
    good = [r for r in _sorted(piped, "id") if r["error_kind"] is None]
    assert [{k: r[k] for k in ("id", *results)} for r in good] == [
        {k: r[k] for k in ("id", *results)} for r in _sorted(data, "id")
    ]  # bit for bit: the same code, and a text's numbers do not depend on the texts batched beside it
    bad = [r for r in piped.to_pylist() if r["error_kind"] is not None]
    assert [(r["id"], r["error_kind"]) for r in bad] == [("r12", "empty_text")]
    assert job.counts["error_rows"] == 1 and job.counts["result_rows"] == len(good)


def test_generate_with_samples_and_a_seed_equals_the_job(tmp_path, replica):
    import ray

    rows = [{"id": f"p{i}", "prompt": line[:12], "limit": 3 + i % 5} for i, line in enumerate(SAMPLE_LINES)]
    (tmp_path / "in").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in" / "p.parquet")
    keys = dict(model=str(replica.source), max_new_tokens=8, num_return_sequences=2, seed=5, temperature=0.9,
                max_new_tokens_column="limit")  # fmt: skip
    fb.run(fb.GenerateJob(input=str(tmp_path / "in"), output=str(tmp_path / "job"), **keys), progress=None)
    piped = fb.generate(ray.data.from_items(rows).random_shuffle(seed=1), batch_size=4, **keys).materialize()
    got = pa.Table.from_pylist(list(piped.iter_rows()))
    cols = ["id", "sample_index", "generation", "generated_tokens", "finish_reason", "generation_nll_sum"]
    assert [{k: r[k] for k in cols} for r in _sorted(got, "id", "sample_index")] == [
        {k: r[k] for k in cols}
        for r in _sorted(pq.read_table(tmp_path / "job" / "data"), "id", "sample_index")
    ]
    assert got.num_rows == 2 * len(rows) and set(got.column_names) >= {"prompt", "limit", "error_kind"}


def test_what_a_processor_cannot_run_is_said_plainly(tmp_path, replica):
    import ray

    with pytest.raises(fb.SpecError, match="input: the processor takes a Dataset"):
        fb.score(ray.data.from_items([{"text": "x"}]), model=str(replica.source), input="x")
    with pytest.raises(fb.SpecError, match="bogus: unknown key"):
        fb.score(ray.data.from_items([{"text": "x"}]), model=str(replica.source), bogus=1)
    with pytest.raises(fb.SpecError, match="dedup: near-duplicates are found across a whole job's output"):
        fb.generate(ray.data.from_items([{"id": "a", "prompt": "x"}]), model=str(replica.source), dedup={})
    with pytest.raises(fb.ModelLoadError):
        fb.score(ray.data.from_items([{"text": "x"}]), model=str(tmp_path / "none"))
    # checked from the dataset's schema when the processor is built, before anything runs
    with pytest.raises(fb.InputError, match="id column 'id' not in the dataset"):
        fb.generate(ray.data.from_items([{"prompt": "北京"}]), model=str(replica.source))
    with pytest.raises(fb.InputError, match="column 'prompt' not in the dataset"):
        fb.generate(ray.data.from_items([{"id": "a", "text": "北京"}]), model=str(replica.source))
    with pytest.raises(fb.InputError, match="text column 'text' is int64, not a string column"):
        fb.score(ray.data.from_items([{"text": 3}]), model=str(replica.source))


def test_the_example_pipeline_runs(tmp_path, replica, ray_cluster):
    import os
    import subprocess
    import sys
    from pathlib import Path

    rows = _rows()
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    example = Path(__file__).resolve().parent.parent / "examples" / "score_in_a_pipeline.py"
    cmd = [sys.executable, str(example), "--model", str(replica.source), "--input", str(tmp_path / "in.jsonl"),
           "--output", str(tmp_path / "kept"), "--min-chars", "10"]  # fmt: skip
    proc = subprocess.run(cmd, env={**os.environ, "RAY_ADDRESS": ray_cluster}, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    kept = pq.read_table(tmp_path / "kept")
    assert sorted(kept.column("id").to_pylist()) == sorted(r["id"] for r in rows if len(r["text"]) >= 10)
    assert kept.column("ppl").null_count == 0


def test_judge_in_a_pipeline_equals_the_job(tmp_path, replica):
    import ray

    rows = [
        {
            "id": "q0",
            "question": "What is aspirin used for?",
            "answers": ["fever", "broken bones"],
            "label": 0,
        },
        {
            "id": "q1",
            "question": SAMPLE_LINES[5] + " Is this true?",
            "answers": ["Yes, it is.", "No."],
            "label": 0,
        },
        {"id": "q2", "question": "阿司匹林用于治疗什么？", "answers": ["退烧", "骨折", "头痛"], "label": 1},
        {"id": "q3", "question": "", "answers": ["x"], "label": 0},
    ]
    (tmp_path / "in").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in" / "q.parquet")
    keys = dict(model=str(replica.source), answers_column="answers", template="{question} {answer}")
    fb.run(fb.JudgeJob(input=str(tmp_path / "in"), output=str(tmp_path / "job"), **keys), progress=None)
    got = pa.Table.from_pylist(list(fb.judge(ray.data.from_items(rows), **keys).iter_rows()))
    cols = ["id", "statements", "candidate_nll_sum", "candidate_token_count", "choice", "margin"]
    assert [{k: r[k] for k in cols} for r in _sorted(got, "id") if r["error_kind"] is None] == [
        {k: r[k] for k in cols} for r in _sorted(pq.read_table(tmp_path / "job" / "data"), "id")
    ]
    assert [(r["id"], r["error_kind"]) for r in got.to_pylist() if r["error_kind"]] == [("q3", "empty_text")]
