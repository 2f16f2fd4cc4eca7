"""The public Python API: light to import, `run` returning what the job wrote, typed errors before Ray starts."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import fengshen_batch as fb
from fengshen_batch.tiny_model import SAMPLE_LINES


def test_import_is_light_and_names_resolve():
    code = (
        "import sys, fengshen_batch as fb; names = [getattr(fb, n) for n in fb.__all__]; "
        "print(sorted(m for m in ('torch', 'ray', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fb.nope  # noqa: B018
    for name in ("SpecError", "InputError", "ModelLoadError", "JobError", "SubmitError"):
        assert issubclass(getattr(fb, name), fb.FengshenError)


def _texts(folder):
    folder.mkdir()
    pq.write_table(
        pa.table({"id": [f"t{i}" for i in range(9)], "text": SAMPLE_LINES[:9]}), folder / "a.parquet"
    )
    return str(folder)


def test_each_kind_of_bad_job_raises_its_own_error_before_ray_starts(tmp_path, replica):
    inp = _texts(tmp_path / "in")
    good = {"model": str(replica.source), "input": inp, "output": str(tmp_path / "out")}
    with pytest.raises(fb.SpecError, match="bogus: unknown key"):
        fb.ScoreJob(**good, bogus=1)
    with pytest.raises(fb.SpecError, match="kind: must be one of score, generate, judge"):
        fb.run({**good, "kind": "scores"})
    with pytest.raises(fb.SpecError, match="not int"):
        fb.run(42)
    with pytest.raises(fb.InputError, match="input not found"):
        fb.run(fb.ScoreJob(**{**good, "input": str(tmp_path / "missing")}))
    with pytest.raises(fb.InputError, match="text column 'body' not in the input"):
        fb.run(fb.ScoreJob(**good, text_column="body"))
    with pytest.raises(fb.ModelLoadError):
        fb.run(fb.ScoreJob(**{**good, "model": str(tmp_path / "no-model")}))
    with pytest.raises(fb.JobError, match="inside the input"):
        fb.run(fb.GenerateJob(**{**good, "output": inp + "/out"}, prompt_column="text"))
    assert not (tmp_path / "out").exists()


@pytest.mark.usefixtures("ray_cluster")
def test_run_returns_the_manifest_it_wrote_and_a_rerun_finds_it_complete(tmp_path, replica):
    spec = {"kind": "score", "model": str(replica.source), "input": _texts(tmp_path / "in"),
            "output": str(tmp_path / "out"), "shard_rows": 4}  # fmt: skip
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({**spec, "output": str(tmp_path / "elsewhere")}))
    # the plan, before anything starts: the rows, shards and tokens the job then counts
    plan = fb.plan({**spec})
    assert (plan.rows, plan.shards, plan.files, plan.exact, plan.already_complete) == (9, 3, 1, True, False)
    from click.testing import CliRunner

    from fengshen_batch.cli import main

    lines = []
    res = CliRunner().invoke(
        main, ["run", str(path), "--set", f"output={spec['output']}"]
    )  # --set over the YAML
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert not (tmp_path / "elsewhere").exists()
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    result = fb.JobResult(spec["output"], on_disk)
    assert plan.tokens["tokens"] == on_disk["counts"]["tokens"] and plan.tokens["error_rows"] == 0
    shown = CliRunner().invoke(main, ["plan", str(path), "--set", f"output={spec['output']}"]).output
    assert "already complete" in shown and "9 rows in 1 files, 3 shards (3 already committed" in shown, shown
    assert f"tokens: tokens {plan.tokens['tokens']:,}" in shown and "GPU-hours" in shown
    bad = CliRunner().invoke(main, ["run", str(path), "--set", "shard_rows"])
    assert bad.exit_code == 2 and "--set wants a spec key and a value joined by" in bad.output
    bad = CliRunner().invoke(main, ["run", str(path), "--set", "shard_rowz=3"])
    assert bad.exit_code == 2 and "shard_rowz" in bad.output
    # a peek at the output: the first rows as JSON lines, long values cut, only the columns asked for
    head = CliRunner().invoke(main, ["head", spec["output"], "-n", "2", "--columns", "id,ppl"])
    assert head.exit_code == 0, head.output
    peeked = [json.loads(line) for line in head.output.splitlines()]
    first = pq.read_table(tmp_path / "out" / "data" / "part-000000.parquet").slice(0, 2)
    assert peeked == first.select(["id", "ppl"]).to_pylist()
    none = CliRunner().invoke(main, ["head", spec["output"], "--errors"])
    assert none.exit_code == 0 and none.output == ""
    missing = CliRunner().invoke(main, ["head", spec["output"], "--columns", "nope"])
    assert missing.exit_code == 2 and "no column 'nope'" in missing.output
    assert result.output == spec["output"] and not result.already_complete
    assert result.manifest == on_disk and result.counts == on_disk["counts"]
    assert result.counts["input_rows"] == 9 == result.counts["result_rows"] and result.manifest["shards"] == 3
    assert any(line.startswith("done: 9 rows") for line in lines)
    again = fb.run(fb.ScoreJob(**{k: v for k, v in spec.items() if k != "kind"}), progress=None)
    assert again.already_complete and again.manifest == on_disk
    # fb.report after a job (whose finish step imported fengshen_batch.reports): still the function
    summary = fb.report(spec["output"])
    assert summary["rows"] == 9 and summary == json.loads(
        (tmp_path / "out" / "report" / "summary.json").read_text()
    )
    with pytest.raises(fb.JobError, match="no _SUCCESS"):
        fb.report(str(tmp_path / "in"))
