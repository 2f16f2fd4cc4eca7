"""Inputs as users have them: outputs of earlier runs, pandas categories, bad ids, hive partitions, nulls."""

from __future__ import annotations

import json
import warnings

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from fengshen_batch.errors import JobError
from fengshen_batch.job.run import run_job
from fengshen_batch.kinds.generation import generate
from fengshen_batch.kinds.scoring import score_texts
from fengshen_batch.model.load import load_replica
from fengshen_batch.params import GenerateParams
from fengshen_batch.reports.histograms import NULL_GROUP
from fengshen_batch.spec import build_spec
from fengshen_batch.tiny_model import SAMPLE_LINES

TEXTS = SAMPLE_LINES[:6]


def _spec(replica, tmp_path, **fields):
    return build_spec({"kind": "score", "model": str(replica.source), "input": str(tmp_path / "in"),
                       "output": str(tmp_path / "out"), **fields})  # fmt: skip


def _data(path) -> list[dict]:
    return sorted(pq.read_table(path / "data").to_pylist(), key=lambda r: r["id"])


@pytest.mark.usefixtures("ray_cluster")
def test_an_input_with_result_columns_is_refused_then_dropped_or_prefixed(tmp_path, replica):
    """Re-scoring last night's output (which has ppl, nll_sum, ... and a CCNet-style `perplexity`)."""
    (tmp_path / "in").mkdir()
    old = [float(i) for i in range(len(TEXTS))]
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(len(TEXTS))], "text": TEXTS, "ppl": old,
                             "nll_sum": old, "perplexity": old}), tmp_path / "in" / "last.parquet")  # fmt: skip
    with pytest.raises(
        JobError, match=r"columns nll_sum, ppl, .*drop_columns: \[nll_sum, ppl\].*result_prefix"
    ):
        run_job(_spec(replica, tmp_path), progress=lambda _: None)
    assert not (tmp_path / "out").exists()  # refused before anything started
    expected, _ = score_texts(replica, TEXTS)

    run_job(_spec(replica, tmp_path, drop_columns=["ppl", "nll_sum"]), progress=lambda _: None)
    dropped = _data(tmp_path / "out")
    assert [r["ppl"] for r in dropped] == [e.ppl for e in expected]
    assert [r["perplexity"] for r in dropped] == old  # the other passthrough column stays

    prefixed = tmp_path / "prefixed"
    spec = _spec(replica, tmp_path, output=str(prefixed), result_prefix="new_", bucket_quantiles=[0.3, 0.7])
    manifest = run_job(spec, progress=lambda _: None)
    rows = _data(prefixed)
    assert [r["ppl"] for r in rows] == old and [r["nll_sum"] for r in rows] == old  # the input's, untouched
    assert [r["new_ppl"] for r in rows] == [e.ppl for e in expected]
    assert [r["new_nll_sum"] for r in rows] == [e.nll_sum for e in expected]
    low, high = manifest["bucket_cutoffs"]
    assert [r["new_bucket"] for r in rows] == [
        "head" if r["new_ppl"] <= low else "middle" if r["new_ppl"] <= high else "tail" for r in rows
    ]
    summary = json.loads((prefixed / "report" / "summary.json").read_text())
    counts = {b: sum(r["new_bucket"] == b for r in rows) for b in ("head", "middle", "tail")}
    assert summary["rows"] == len(TEXTS) and summary["buckets"] == counts

    # the report rebuilt from the files reads the prefixed columns
    from fengshen_batch.io.outputs import OutputStore
    from fengshen_batch.io.storage import StorageSpec
    from fengshen_batch.reports.score_report import build_report

    rebuilt = build_report(OutputStore(str(prefixed), StorageSpec()), manifest, by="perplexity")
    assert rebuilt["corpus_ppl"] == pytest.approx(summary["corpus_ppl"])


@pytest.mark.usefixtures("ray_cluster")
def test_dictionary_encoded_text_is_read_and_dictionary_passthrough_kept(tmp_path, replica):
    (tmp_path / "in").mkdir()
    source = pa.array(["web", "books", "web", "news", "web", "books"]).dictionary_encode()
    table = pa.table({"doc": [f"doc-{i}" for i in range(len(TEXTS))], "text": pa.array(TEXTS).dictionary_encode(),
                      "source": source})  # pandas `category`; ids in a column of another name  # fmt: skip
    pq.write_table(table, tmp_path / "in" / "cat.parquet")
    run_job(_spec(replica, tmp_path, report_by="source", id_column="doc"), progress=lambda _: None)
    summary = json.loads((tmp_path / "out" / "report" / "summary.json").read_text())
    assert summary["rows"] == len(TEXTS) and set(summary["groups"]) == {"web", "books", "news"}
    page = (tmp_path / "out" / "report" / "report.html").read_text()
    assert all(f"doc-{i}" in page for i in range(len(TEXTS)))  # the example documents by their ids
    out = pq.read_table(tmp_path / "out" / "data")
    assert pa.types.is_dictionary(out.schema.field("source").type)
    expected, _ = score_texts(replica, TEXTS)
    assert out.column("nll_sum").to_pylist() == [e.nll_sum for e in expected]
    assert out.column("source").to_pylist() == source.to_pylist()


@pytest.mark.usefixtures("ray_cluster")
def test_null_and_repeated_ids_go_to_errors(tmp_path, replica):
    (tmp_path / "in").mkdir()
    ids = ["a", None, "b", "a", "c", "b"]
    pq.write_table(pa.table({"doc": ids, "prompt": TEXTS}), tmp_path / "in" / "p.parquet")
    spec = build_spec({"kind": "generate", "model": str(replica.source), "input": str(tmp_path / "in"),
                       "output": str(tmp_path / "out"), "id_column": "doc", "max_new_tokens": 4, "seed": 1,
                       "temperature": 0.9, "shard_rows": 4})  # fmt: skip
    manifest = run_job(spec, progress=lambda _: None)
    data = pq.read_table(tmp_path / "out" / "data").to_pylist()
    errors = pq.read_table(tmp_path / "out" / "errors").to_pylist()
    # shards of 4 rows: ["a", None, "b", "a"] and ["c", "b"]; ids are checked within a shard
    assert [r["doc"] for r in data] == ["a", "b", "c", "b"]
    assert [(e["doc"], e["error_kind"]) for e in errors] == [(None, "null_id"), ("a", "duplicate_id")]
    assert errors[1]["prompt"] == TEXTS[3]  # the later row is the one refused
    assert manifest["counts"]["error_kinds"] == {"null_id": 1, "duplicate_id": 1}
    alone = generate(replica, [TEXTS[0]], ["a"], spec.params())[0][0]
    assert data[0]["generation"] == alone.generation


@pytest.mark.usefixtures("ray_cluster")
def test_hive_partitions_become_columns_and_report_groups_add_up(tmp_path, replica):
    for i, folder in enumerate(["source=web", "source=books", "source=__HIVE_DEFAULT_PARTITION__"]):
        (tmp_path / "in" / folder).mkdir(parents=True)
        texts = TEXTS[2 * i : 2 * i + 2]
        pq.write_table(pa.table({"text": texts}), tmp_path / "in" / folder / "part-0.parquet")
    manifest = run_job(_spec(replica, tmp_path, report_by="source"), progress=lambda _: None)
    rows = pq.read_table(tmp_path / "out" / "data").to_pylist()
    # the same columns pyarrow's own hive partitioning reads (as strings here, in every file alike)
    reference = ds.dataset(tmp_path / "in", format="parquet", partitioning="hive").to_table()
    pairs = zip(reference.column("text").to_pylist(), reference.column("source").to_pylist(), strict=True)
    assert {(r["text"], r["source"]) for r in rows} == set(pairs) and len(rows) == len(reference)
    assert {r["source"] for r in rows} == {"web", "books", None}
    summary = json.loads((tmp_path / "out" / "report" / "summary.json").read_text())
    assert set(summary["groups"]) == {"web", "books", NULL_GROUP}
    assert (
        sum(g["rows"] for g in summary["groups"].values())
        == summary["rows"]
        == manifest["counts"]["result_rows"]
    )


def test_partition_folders_must_agree(tmp_path):
    from fengshen_batch.io.inputs import InputError, inspect_inputs
    from fengshen_batch.io.storage import StorageSpec

    (tmp_path / "in" / "lang=zh").mkdir(parents=True)
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "in" / "lang=zh" / "x.parquet")
    pq.write_table(pa.table({"text": ["b"]}), tmp_path / "in" / "y.parquet")
    with pytest.raises(InputError, match="key=value folders"):
        inspect_inputs(str(tmp_path / "in"), StorageSpec(), "text", None)


def test_no_deprecated_apis_on_our_side(tiny_model_dir):
    """Loading, scoring and generating warn of nothing (transformers' past_key_values deprecation was the
    one users saw from every actor): the job keeps working on the next transformers release."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        replica = load_replica(str(tiny_model_dir), device="cpu", dtype="float32")
        generate(replica, TEXTS[:2], ["a", "b"], GenerateParams(max_new_tokens=6, temperature=0.8, seed=2))
        score_texts(replica, TEXTS[:2])
    bad = [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert not bad, [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in bad]


def _raw_strings(values: list[bytes]) -> pa.Array:
    """A string array holding these bytes unchecked (as a writer that skips validation leaves them)."""
    offsets = [0]
    for v in values:
        offsets.append(offsets[-1] + len(v))
    buffers = [None, pa.array(offsets, pa.int32()).buffers()[1], pa.py_buffer(b"".join(values))]
    return pa.Array.from_buffers(pa.string(), len(values), buffers)


@pytest.mark.usefixtures("ray_cluster")
def test_a_row_of_invalid_utf8_goes_to_errors_and_the_job_goes_on(tmp_path, replica):
    """Issue 32, case 7: one row's text is not UTF-8. Through the CLI, for score and generate: that row is in
    errors/ with its reason and its text readable (U+FFFD in place of the bad bytes), the others are done,
    exit 0; before, every run of the job failed on the same row."""
    from click.testing import CliRunner

    from fengshen_batch.cli import main

    (tmp_path / "in").mkdir()
    values = [t.encode() for t in TEXTS[:4]]
    values[2] = "坏的".encode() + b" \xff\xfe bytes"
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(4)], "text": _raw_strings(values)}),
                   tmp_path / "in" / "part-0.parquet")  # fmt: skip
    for kind, extra in (("score", []), ("generate", ["--max-new-tokens", "3", "--prompt-column", "text"])):
        out = tmp_path / f"out-{kind}"
        res = CliRunner().invoke(main, [kind, "--model", str(replica.source), "--input", str(tmp_path / "in"),
                                        "--output", str(out), *extra])  # fmt: skip
        assert res.exit_code == 0, res.output
        (bad,) = pq.read_table(out / "errors").to_pylist()
        assert (bad["id"], bad["error_kind"]) == ("d2", "invalid_utf8")
        assert "column 'text' is not valid UTF-8 (byte 0xff at byte 7)" in bad["error_message"]
        assert bad["text"] == "坏的 \ufffd\ufffd bytes"
        assert sorted(set(pq.read_table(out / "data").column("id").to_pylist())) == ["d0", "d1", "d3"]
        assert json.loads((out / "manifest.json").read_text())["counts"]["error_rows"] == 1


@pytest.mark.usefixtures("ray_cluster")
def test_report_by_many_values_leaves_the_breakdown_out_and_a_null_is_not_the_string_null(tmp_path, replica):
    """Issue 32, case 8, through the CLI: report_by a column of 300 distinct values (an id-like column) keeps
    every shard's marker small and the report says why there is no breakdown; report_by a column holding
    the string "null" and real nulls gives them two groups."""
    import yaml
    from click.testing import CliRunner

    from fengshen_batch.cli import main
    from fengshen_batch.reports.histograms import MAX_GROUPS, NULL_GROUP

    n = MAX_GROUPS + 44
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(n)], "text": [TEXTS[i % 6] for i in range(n)],
                             "doc": [f"doc-{i}" for i in range(n)], "source": (["null", None, "web"] * n)[:n]}),
                   tmp_path / "in" / "part-0.parquet")  # fmt: skip
    for by in ("doc", "source"):
        spec = tmp_path / f"{by}.yaml"
        spec.write_text(yaml.safe_dump({"kind": "score", "model": str(replica.source), "input": str(tmp_path / "in"),
                                        "output": str(tmp_path / by), "report_by": by, "shard_rows": 150}))  # fmt: skip
        res = CliRunner().invoke(main, ["run", str(spec)])
        assert res.exit_code == 0, res.output
        summary = json.loads((tmp_path / by / "report" / "summary.json").read_text())
        page = (tmp_path / by / "report" / "report.html").read_text()
        if by == "doc":
            assert summary["groups"] == {} and summary["groups_left_out"] > MAX_GROUPS
            assert "per-group figures are left out" in page
            assert max(p.stat().st_size for p in (tmp_path / by / "_markers").iterdir()) < 64_000
        else:
            rows = {g: s["rows"] for g, s in summary["groups"].items()}
            assert rows == {"null": n - 2 * (n // 3), NULL_GROUP: n // 3, "web": n // 3}
            assert "<td>(null)</td>" in page and "<td>null</td>" in page


@pytest.mark.usefixtures("ray_cluster")
def test_prompts_cut_to_fit_a_near_context_limit_are_counted_and_said(tmp_path, replica):
    """Issue 32, case 8: max_new_tokens near the context cuts prompts from the left (truncate_left, the
    default): the manifest counts the prompts cut and the tokens dropped, and the terminal says so."""
    from click.testing import CliRunner

    from fengshen_batch.cli import main

    (tmp_path / "in").mkdir()
    texts = [TEXTS[i] * (1 + i % 3) for i in range(6)]
    pq.write_table(
        pa.table({"id": [f"p{i}" for i in range(6)], "text": texts}), tmp_path / "in" / "p.parquet"
    )
    limit = replica.max_length - 8  # room for 8 prompt tokens
    room = replica.max_length - limit
    lengths = [len(replica.encode(t)) for t in texts]
    args = ["generate", "--model", str(replica.source), "--input", str(tmp_path / "in"), "--output",
            str(tmp_path / "out"), "--max-new-tokens", str(limit), "--prompt-column", "text"]  # fmt: skip
    shown = CliRunner().invoke(main, [*args, "--plan"])  # the plan says it before anything runs
    assert shown.exit_code == 0 and not (tmp_path / "out").exists(), shown.output
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    counts = json.loads((tmp_path / "out" / "manifest.json").read_text())["counts"]
    assert (
        f"prompt tokens {counts['prompt_tokens']:,}, generated tokens at most {6 * limit:,}, prompts truncated "
        f"{counts['truncated_prompts']}, prompt tokens truncated {counts['truncated_prompt_tokens']}"
    ) in shown.output
    assert "warning: " in shown.output and "would be cut from the left" in shown.output
    # tokens on the done line: each prompt once, and what was generated
    done = next(line for line in res.output.splitlines() if line.startswith("done:"))
    assert f"{counts['prompt_tokens']:,} prompt + {counts['generated_tokens']:,} generated tokens" in done
    assert counts["tokens"] == counts["prompt_tokens"] + counts["generated_tokens"]
    generated = pq.read_table(tmp_path / "out" / "data").column("generated_tokens").to_pylist()
    assert counts["generated_tokens"] == sum(generated)
    cut = [n - room for n in lengths if n > room]
    assert cut and counts["truncated_prompts"] == len(cut) and counts["truncated_prompt_tokens"] == sum(cut)
    assert f"warning: {len(cut)} prompts were cut from the left" in res.output
    assert (
        f"report: {tmp_path / 'out'}/report/report.html" in res.output
    )  # issue 33: the report on the done line


@pytest.mark.usefixtures("ray_cluster")
def test_jsonl_and_csv_inputs_score_as_their_parquet_does(tmp_path, replica):
    """JSON Lines (gzipped too) and CSV: the same rows as Parquet give the same results, the same checks
    refuse what cannot run (an unparseable file, a missing column, formats mixed in one input)."""
    import csv
    import gzip

    from click.testing import CliRunner

    from fengshen_batch.cli import main

    rows = [
        {"id": f"r{i}", "text": TEXTS[i % len(TEXTS)] * (1 + i % 2), "source": f"s{i % 2}"} for i in range(7)
    ]
    rows.append({"id": "r7", "text": None, "source": "s1"})
    for name in ("pq", "jsonl", "csv"):
        (tmp_path / name).mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pq" / "a.parquet")

    def jsonl(part):
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part)

    (tmp_path / "jsonl" / "a.jsonl").write_text(jsonl(rows[:4]), encoding="utf-8")
    (tmp_path / "jsonl" / "b.jsonl.gz").write_bytes(gzip.compress(jsonl(rows[4:]).encode()))
    with open(tmp_path / "csv" / "a.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, ["id", "text", "source"])
        w.writeheader()
        w.writerows(rows)

    def score(name):
        res = CliRunner().invoke(main, ["score", "--model", str(replica.source), "--input", str(tmp_path / name),
                                        "--output", str(tmp_path / f"out-{name}")])  # fmt: skip
        assert res.exit_code == 0, res.output
        data = pq.read_table(tmp_path / f"out-{name}" / "data").sort_by("id")
        errors = pq.read_table(tmp_path / f"out-{name}" / "errors")
        return data.select(["id", "text", "source", "nll_sum", "token_count"]).to_pylist(), errors.column(
            "id"
        ).to_pylist()

    want = score("pq")
    assert score("jsonl") == want and want[1] == ["r7"]
    got_csv = score("csv")
    assert got_csv[0] == want[0]
    assert got_csv[1] == ["r7"]  # an empty CSV cell: the row's error, as a null is in Parquet

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jsonl").write_text('{"text": "ok"}\n{"text": "cut\n', encoding="utf-8")
    (tmp_path / "mixed").mkdir()
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "mixed" / "a.parquet")
    (tmp_path / "mixed" / "b.csv").write_text("text\nb\n", encoding="utf-8")
    for folder, message in (("bad", "cannot read JSON Lines file"), ("mixed", "mixes CSV files and Parquet files"),
                            ("csv", "text column 'body' not in the input")):  # fmt: skip
        args = [
            "score",
            "--model",
            str(replica.source),
            "--input",
            str(tmp_path / folder),
            "--output",
            str(tmp_path / "o"),
        ]
        res = CliRunner().invoke(main, args + (["--text-column", "body"] if folder == "csv" else []))
        assert res.exit_code == 2 and message in res.output, res.output
