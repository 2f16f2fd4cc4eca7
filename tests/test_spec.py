"""Job specs and the CLI's handling of bad ones: named errors, exit code 2, nothing started."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from fengshen_batch.cli import main
from fengshen_batch.spec import GenerateJob, ScoreJob, SpecError, build_spec, load_spec, spec_record
from tests.helpers import PLANTED_SECRET

JOBS = Path(__file__).resolve().parent.parent / "jobs"
BASE = {"model": "m", "input": "in", "output": "out"}


@pytest.mark.parametrize("path", sorted(JOBS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_job_specs_validate(path):
    spec = load_spec(path)
    assert spec.name and spec.model.startswith("s3://")
    assert isinstance(spec, ScoreJob if spec.kind == "score" else GenerateJob)


def test_spec_fields_and_engine_params():
    spec = build_spec({"kind": "generate", **BASE, "actors": "2,6", "stop": "\n", "top_p": 0.9})
    assert spec.actors == (2, 6) and spec.params().stop == ("\n",) and spec.params().top_p == 0.9
    assert build_spec({"kind": "score", **BASE, "actors": 3}).actors == (3, 3)
    assert build_spec({"kind": "score", **BASE, "stride": 128}).params().stride == 128
    gen = build_spec({"kind": "generate", **BASE, "max_num_seqs": 8, "cpu_kv_cache_gb": 0.5,
                      "max_new_tokens_column": "limit"})  # fmt: skip
    assert gen.engine_params().max_num_seqs == 8 and gen.engine_params().cpu_kv_cache_gb == 0.5
    assert gen.number_columns() == ["limit"] and "max_num_seqs" not in gen.params().model_fields


@pytest.mark.parametrize(
    "fields,named",
    [
        ({"kind": "score", **BASE, "batchsize": 4}, "batchsize: unknown key"),
        ({"kind": "score", **BASE, "storage": {"secret_key": "x"}}, "storage.secret_key: unknown key"),
        ({"kind": "generate", **BASE, "top_p": 1.5}, "top_p: Input should be less than or equal to 1"),
        (
            {"kind": "generate", **BASE, "temperature": -1},
            "temperature: Input should be greater than or equal to 0",
        ),
        ({"kind": "score", **BASE, "actors": "4,2"}, "actors needs 1 <= MIN <= MAX"),
        ({"kind": "score", **BASE, "dtype": "fp8"}, "dtype"),
        ({"kind": "translate", **BASE}, "kind"),
        ({"kind": "score", "input": "in", "output": "out"}, "model: Field required"),
        ({"kind": "score", **BASE, "max_new_tokens": 5}, "max_new_tokens: unknown key"),
        ({"kind": "score", **BASE, "max_num_seqs": 5}, "max_num_seqs: unknown key"),
        ({"kind": "generate", **BASE, "max_concurrent_batches": 0}, "max_concurrent_batches"),
    ],
)
def test_bad_specs_name_the_field(fields, named):
    with pytest.raises(SpecError, match=named.replace(".", r"\.")):
        build_spec(fields)


def test_spec_record_drops_url_userinfo():
    spec = build_spec({"kind": "score", "model": "m", "input": "s3://u:p@host/in", "output": "out",
                       "storage": {"endpoint_url": "http://user:pw@127.0.0.1:9000"}})  # fmt: skip
    record = spec_record(spec)
    assert "pw" not in str(record) and ":p@" not in str(record)


def _cli(args):
    return CliRunner().invoke(main, args)


def test_cli_user_errors_are_one_line_and_exit_2(tmp_path, tiny_model_dir):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"text": ["a"], "n": [1]}), tmp_path / "in" / "a.parquet")
    (tmp_path / "in" / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet")
    (tmp_path / "empty").mkdir()
    (tmp_path / "ints").mkdir()
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints" / "a.parquet")
    (tmp_path / "good").mkdir()
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "good" / "a.parquet")
    model, out = str(tiny_model_dir), str(tmp_path / "out")
    cases = [
        (["score", "--model", model, "--input", str(tmp_path / "missing"), "--output", out], "input not found"),
        (["score", "--model", model, "--input", str(tmp_path / "empty"), "--output", out], "no Parquet, JSON Lines or CSV files"),
        (["score", "--model", model, "--input", str(tmp_path / "in"), "--output", out], "corrupt.parquet"),
        (["score", "--model", model, "--input", str(tmp_path / "ints"), "--output", out], "'text' is int64"),
        (["score", "--model", model, "--input", str(tmp_path / "ints"), "--output", out, "--text-column", "body"],
         "text column 'body' not in the input"),
        (["score", "--model", model, "--input", str(tmp_path / "good"), "--output", out, "--id-column", "nope"],
         "id column 'nope'"),
        (["generate", "--model", model, "--input", "x", "--output", out, "--top-p", "0"], "top_p"),
        (["generate", "--model", model, "--input", str(tmp_path / "good"), "--output", out, "--prompt-column",
          "text", "--max-new-tokens-column", "limit"], "max_new_tokens column 'limit' not in the input"),
        (["generate", "--model", model, "--input", str(tmp_path / "good"), "--output", out, "--prompt-column",
          "text", "--max-new-tokens-column", "text"], "max_new_tokens column 'text' is string, not a column"),
        (["generate", "--model", model, "--input", "x", "--output", out, "--max-num-seqs", "0"], "max_num_seqs"),
        (["generate", "--model", model, "--input", "x", "--output", out, "--gpu-memory-utilization", "1.5"],
         "gpu_memory_utilization"),
    ]  # fmt: skip
    for args, message in cases:
        res = _cli(args)
        assert res.exit_code == 2, (args, res.output)
        assert message in res.output, (args, res.output)
        assert "Traceback" not in res.output
    assert not (tmp_path / "out").exists()  # nothing published


def test_model_and_output_location_errors(tmp_path):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "in" / "a.parquet")
    res = _cli(["score", "--model", str(tmp_path / "nomodel"), "--input", str(tmp_path / "in"),
                "--output", str(tmp_path / "out")])  # fmt: skip
    assert res.exit_code == 2 and "model not found" in res.output
    res = _cli(["score", "--model", str(tmp_path), "--input", str(tmp_path / "in"),
                "--output", str(tmp_path / "in" / "scores")])  # fmt: skip
    assert res.exit_code == 2 and "inside the input" in res.output


def test_every_option_is_documented_in_help():
    for command in ("score", "generate", "run", "demo"):
        res = _cli([command, "--help"])
        assert res.exit_code == 0
        for param in main.commands[command].params:
            if param.param_type_name == "option":
                assert param.help, f"{command} {param.opts} has no help"


def test_unreachable_storage_and_refused_credentials(tmp_path, tiny_model_dir, s3_endpoint, monkeypatch):
    from tests.helpers import FaultyS3Proxy

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", PLANTED_SECRET)
    model, out = str(tiny_model_dir), str(tmp_path / "out")
    res = _cli(["score", "--model", model, "--input", "s3://corpus/in/", "--output", out,
                "--endpoint-url", "http://127.0.0.1:9"])  # fmt: skip  # a closed port: unreachable storage
    assert res.exit_code == 2 and "cannot list input s3://corpus/in/" in res.output, res.output
    proxy = FaultyS3Proxy(s3_endpoint, every=1, status=403, code="InvalidAccessKeyId")
    try:
        res = _cli(["score", "--model", model, "--input", "s3://corpus/in/", "--output", out,
                    "--endpoint-url", proxy.url])  # fmt: skip
    finally:
        proxy.stop()
    assert res.exit_code == 2 and "cannot list input" in res.output and "Permission" in res.output, res.output
    assert PLANTED_SECRET not in res.output


def test_version():
    from fengshen_batch import __version__

    res = _cli(["--version"])
    assert res.exit_code == 0 and res.output == f"fengshen-batch {__version__}\n"


def test_debug_shows_the_traceback(tmp_path):
    res = _cli(["score", "--model", "m", "--input", str(tmp_path / "nope"), "--output", "o", "--debug"])
    assert res.exit_code != 0 and isinstance(res.exception, Exception)
    assert "input not found" in str(res.exception)


def test_drop_columns_and_result_prefix_from_the_command_line():
    from fengshen_batch.cli.options import spec_fields

    opts = {"model": "m", "input_": "i", "output": "o", "drop_columns": ("ppl", "nll_sum"),
            "result_prefix": "new_", "endpoint_url": None, "region": None, "anonymous": None}  # fmt: skip
    spec = build_spec(spec_fields("score", opts))
    assert spec.drop_columns == ("ppl", "nll_sum") and spec.result_prefix == "new_"
    assert build_spec({"kind": "score", **BASE, "drop_columns": "ppl"}).drop_columns == ("ppl",)
    with pytest.raises(SpecError, match="result_prefix"):
        build_spec({"kind": "score", **BASE, "result_prefix": "new ppl"})


def test_a_hub_id_without_a_reachable_hub_is_refused_before_ray_starts(tmp_path, monkeypatch):
    """Issue 33: one line and exit 2 before Ray starts (before: the actors died, 368 lines, exit 1)."""
    import huggingface_hub.constants

    from tests.helpers import write_texts

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # a closed port
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    write_texts(tmp_path / "in", files=(2,))
    res = _cli(["score", "--model", "IDEA-CCNL/Wenzhong-GPT2-3.5B", "--input", str(tmp_path / "in"),
                "--output", str(tmp_path / "out")])  # fmt: skip
    assert res.exit_code == 2, res.output
    assert res.output.startswith(
        "error: cannot reach the Hugging Face hub to fetch 'IDEA-CCNL/Wenzhong-GPT2-3.5B'"
    )
    assert len(res.output.strip().splitlines()) == 1 and "local Ray" not in res.output
