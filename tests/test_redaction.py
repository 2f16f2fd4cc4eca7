"""Issue 32, case 6: no planted secret leaves the process. Through the CLI (a job's manifest, reports, markers,
data and terminal output; a model URL with a token that fails to load), through `submit`'s plan (a spec
carrying credentials is refused before anything reaches a cluster), and in log records."""

from __future__ import annotations

import json
import logging

import pytest
import yaml
from click.testing import CliRunner

from fengshen_batch.cli import main
from fengshen_batch.io.redact import (
    MASK,
    install_log_redaction,
    redact_env,
    redact_record,
    redact_text,
    redact_url,
)
from tests.helpers import PLANTED_SECRET, write_texts


def test_urls_environment_values_and_text_are_redacted(monkeypatch):
    s = PLANTED_SECRET
    assert redact_url(f"https://user:{s}@127.0.0.1:9/models/w") == "https://***@127.0.0.1:9/models/w"
    signed = f"https://b.s3.amazonaws.com/x.parquet?X-Amz-Signature={s}&X-Amz-Expires=60"
    assert redact_url(signed) == "https://b.s3.amazonaws.com/x.parquet?X-Amz-Signature=***&X-Amz-Expires=***"
    for plain in ("s3://corpus/in/", "/data/in/part-0.parquet", "IDEA-CCNL/Wenzhong-GPT2-3.5B"):
        assert redact_url(plain) == plain
    env = {"WANDB_API_KEY": s, "AZURE_STORAGE_KEY": s, "DB_PASSWD": s, "AZURE_STORAGE_CONNECTION_STRING": s,
           "HF_TOKEN": s, "MY_SETTING": s, "HF_HOME": "/cache/hf", "OMP_NUM_THREADS": "4",
           "AWS_ENDPOINT_URL": f"http://k:{s}@127.0.0.1:9"}  # fmt: skip
    shown = redact_env(env)
    assert shown["HF_HOME"] == "/cache/hf" and shown["OMP_NUM_THREADS"] == "4"
    assert shown["AWS_ENDPOINT_URL"] == "http://***@127.0.0.1:9"
    assert all(shown[k] == MASK for k in env if k not in ("HF_HOME", "OMP_NUM_THREADS", "AWS_ENDPOINT_URL"))
    monkeypatch.setenv("SOME_SERVICE_TOKEN", "tok-" + s)
    text = f"failed: GET https://u:{s}@h/x?sig={s} with api_key={s}; header tok-{s} (3 rows)"
    clean = redact_text(text)
    assert s not in clean and "(3 rows)" in clean and "https://***@h/x?sig=***" in clean
    settings = "max_new_tokens=64 leaves no room; token_budget=2048, sort_key_column=id"
    assert redact_text(settings) == settings
    record = redact_record({"runtime_env": {"env_vars": env, "pip": [f"--index-url https://u:{s}@pypi.local/simple"]},
                            "model": f"s3://{s}@bucket/m", "password": s, "actors": 2})  # fmt: skip
    assert s not in json.dumps(record) and record["actors"] == 2


def test_log_records_are_redacted_as_they_are_made(caplog, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", PLANTED_SECRET)
    install_log_redaction()
    install_log_redaction()  # once is enough; twice changes nothing
    with caplog.at_level(logging.INFO):
        logging.getLogger("fengshen_batch.test").info(
            "loading %s with key %s", "https://a:b@h/m", PLANTED_SECRET
        )
    (record,) = [r for r in caplog.records if r.name == "fengshen_batch.test"]
    assert record.getMessage() == "loading https://***@h/m with key ***"


@pytest.mark.usefixtures("ray_cluster")
def test_a_job_writes_and_prints_no_planted_secret(tmp_path, tiny_model_dir, monkeypatch):
    """A spec whose runtime_env holds credentials (a local run keeps them in its record only) and a process
    whose environment holds one: the manifest shows the allowed settings and masks the rest; no file of the
    output and no line of the terminal holds the secret."""
    s = PLANTED_SECRET
    monkeypatch.setenv("AZURE_STORAGE_KEY", s)
    write_texts(tmp_path / "in", files=(6,))
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({
        "kind": "score", "name": "night", "model": str(tiny_model_dir), "input": str(tmp_path / "in"),
        "output": str(tmp_path / "out"), "report_by": "source",
        "runtime_env": {"env_vars": {"WANDB_API_KEY": s, "PIP_INDEX_URL": f"https://u:{s}@127.0.0.1:9/simple",
                                     "HF_HOME": "/cache/hf"},
                        "pip": [f"--extra-index-url https://u:{s}@127.0.0.1:9/simple", "pyarrow"]},
    }))  # fmt: skip
    res = CliRunner().invoke(main, ["run", str(spec)])
    assert res.exit_code == 0, res.output
    assert s not in res.output
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert any(p.name == "manifest.json" for p in files) and any(p.suffix == ".html" for p in files)
    for p in files:
        assert s.encode() not in p.read_bytes(), p
    env = json.loads((tmp_path / "out" / "manifest.json").read_text())["spec"]["runtime_env"]["env_vars"]
    assert env == {"WANDB_API_KEY": MASK, "PIP_INDEX_URL": MASK, "HF_HOME": "/cache/hf"}


def test_a_model_url_with_a_token_fails_in_one_line_without_it(tmp_path):
    write_texts(tmp_path / "in", files=(3,))
    url = f"http://reader:{PLANTED_SECRET}@127.0.0.1:9/models/wenzhong"  # a closed port
    res = CliRunner().invoke(main, ["score", "--model", url, "--input", str(tmp_path / "in"),
                                    "--output", str(tmp_path / "out")])  # fmt: skip
    assert res.exit_code == 2, res.output
    assert PLANTED_SECRET not in res.output and "http://***@127.0.0.1:9/models/wenzhong" in res.output


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"runtime_env": {"env_vars": {"WANDB_API_KEY": PLANTED_SECRET}}}, "WANDB_API_KEY"),
        ({"runtime_env": {"env_vars": {"AZURE_STORAGE_KEY": PLANTED_SECRET}}}, "AZURE_STORAGE_KEY"),
        ({"runtime_env": {"env_vars": {"DB_PASSWD": PLANTED_SECRET}}}, "DB_PASSWD"),
        ({"model": f"s3://AKIA:{PLANTED_SECRET}@models/wenzhong/"}, "model"),
        ({"input": f"https://h/in.parquet?X-Amz-Signature={PLANTED_SECRET}"}, "input"),
        ({"runtime_env": {"pip": [f"--index-url https://u:{PLANTED_SECRET}@pypi.local/simple"]}}, "pip"),
        ({"storage": {"endpoint_url": f"http://k:{PLANTED_SECRET}@127.0.0.1:9"}}, "storage.endpoint_url"),
    ],
    ids=["api-key", "storage-key", "passwd", "model-userinfo", "input-query-token", "pip-index", "endpoint"],
)
def test_submit_refuses_a_spec_that_carries_credentials(tmp_path, fields, named):
    from fengshen_batch.errors import FengshenError
    from fengshen_batch.submission.plan import plan

    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"kind": "score", "name": "x", "model": "s3://m/w/", "input": "s3://b/i/",
                                    "output": "s3://b/o/", **fields}))  # fmt: skip
    with pytest.raises(FengshenError) as e:
        plan(str(spec), "http://127.0.0.1:9")
    assert named in str(e.value) and PLANTED_SECRET not in str(e.value)
