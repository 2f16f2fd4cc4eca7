"""Constrained generation on the tiny model with sampling: every finished sample checked by an independent
validator (Python's `re`, `json` + `jsonschema`, the choice list), greedy under a permissive constraint equal
to unconstrained greedy, EOS never inside a JSON string, masks over a padded vocabulary, n > 1 and seeds
whatever runs beside them, preemption, outputs cut by their limit, bad constraints refused before any model
loads, per-row constraints, and the CLI job and the processor giving the same rows."""

from __future__ import annotations

import json
import re

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

import fengshen_batch as fb
from fengshen_batch.cli import main
from fengshen_batch.constraints import Constraint, build, row_constraint
from fengshen_batch.engine.kv_cache import BLOCK
from fengshen_batch.engine.llm_engine import LLMEngine
from fengshen_batch.engine.stop import token_bytes
from fengshen_batch.kinds.generation import generate
from fengshen_batch.params import EngineParams, GenerateParams
from fengshen_batch.tiny_model import SAMPLE_LINES

PROMPTS = [line[:20] for line in SAMPLE_LINES[:6]]
IDS = [f"r{i}" for i in range(len(PROMPTS))]
RECORD = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age"],
}
SUM = r"\((0|[1-9][0-9]{0,3})(\+(0|[1-9][0-9]{0,3}))*\)"  # what the grammar below spells, as a Python re
LARK = 'start: "(" num ("+" num)* ")"\nnum: /0|[1-9][0-9]{0,3}/'
GBNF = 'root ::= "[" item ("," item)* "]"\nitem ::= "x" | "yy"'


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _valid(c: Constraint, text: str) -> bool:
    """An independent verdict on a finished output."""
    if c.choice:
        return text in c.choice
    if c.regex:
        return re.fullmatch(c.regex, text) is not None
    if c.json_schema is not None:
        try:
            jsonschema.validate(json.loads(text), c.json_schema)
        except (json.JSONDecodeError, jsonschema.ValidationError):
            return False
        return set(json.loads(text)) <= set(c.json_schema["properties"])  # no keys the schema does not name
    return re.fullmatch(SUM if "num" in c.grammar else r"\[(x|yy)(,(x|yy))*\]", text) is not None


@pytest.mark.parametrize(
    "constraint",
    [
        Constraint(choice=["positive", "negative", "中性"]),
        Constraint(regex=r"[a-z]{2,6}-[0-9]{2}"),
        Constraint(json_schema=RECORD),
        Constraint(grammar=LARK),
        Constraint(grammar=GBNF),
    ],
    ids=["choice", "regex", "json_schema", "lark", "gbnf"],
)
def test_every_finished_sample_validates(replica, constraint):
    params = GenerateParams(
        max_new_tokens=60, temperature=1.0, seed=2, num_return_sequences=4, constraint=constraint
    )
    results = generate(replica, PROMPTS, IDS, params)
    samples = [s for r in results for s in r]
    done = [s for s in samples if s.finish_reason == "stop"]
    assert len(done) >= len(samples) // 2, [s.generation for s in samples]
    for s in samples:
        assert s.constraint_satisfied == _valid(constraint, s.generation), s.generation
        assert s.constraint_satisfied == (s.finish_reason == "stop"), (s.generation, s.finish_reason)
    assert len({s.generation for s in samples}) > 1  # sampled, not one forced string


def test_greedy_under_a_constraint_that_allows_its_tokens_equals_unconstrained_greedy(replica):
    prompts = [line[:20] for line in SAMPLE_LINES]
    ids = [f"g{i}" for i in range(len(prompts))]
    free = generate(replica, prompts, ids, GenerateParams(max_new_tokens=12, greedy=True))
    pieces = token_bytes(replica.tokenizer, replica.model.vocab_size)
    checked = 0
    for prompt, rid, (sample,) in zip(prompts, ids, free, strict=True):
        # the greedy output's longest prefix that is whole UTF-8 text, as the only choice: every greedy
        # token is allowed, so greedy picks each one and stops where the choice is complete
        body = [t for t in sample.token_ids if t != replica.eos_id]
        k = max(
            (k for k in range(1, len(body) + 1) if _utf8(b"".join(pieces[t] for t in body[:k]))), default=0
        )
        if k == 0:
            continue
        text = b"".join(pieces[t] for t in body[:k]).decode()
        c = Constraint(choice=[text])
        (got,) = generate(
            replica, [prompt], [rid], GenerateParams(max_new_tokens=12, greedy=True, constraint=c)
        )[0]
        assert got.token_ids == body[:k] and got.generation == text
        assert got.token_logprobs == sample.token_logprobs[:k]  # the model's own numbers, unwarped
        assert got.constraint_satisfied and got.finish_reason == "stop"
        checked += 1
    assert checked >= 3
    # a constraint that allows any text: the same tokens and numbers wherever greedy's output is whole UTF-8
    # text (a regex matches characters: a random model's stray bytes are not text), ended by the same limit
    anything = Constraint(regex=r"[\s\S]*")
    got = generate(replica, prompts, ids, GenerateParams(max_new_tokens=12, greedy=True, constraint=anything))
    same = 0
    for (a,), (b,) in zip(free, got, strict=True):
        if a.finish_reason == "length" and _utf8(b"".join(pieces[t] for t in a.token_ids)):
            assert (b.token_ids, b.token_logprobs, b.generation) == (
                a.token_ids,
                a.token_logprobs,
                a.generation,
            )
            assert b.finish_reason == "length" and b.constraint_satisfied
            same += 1
    assert same >= 1


def test_eos_never_inside_a_json_string_and_never_past_the_tokenizer(replica):
    tok = replica.tokenizer
    padded = len(tok) + 24  # a model vocabulary padded past the tokenizer's, as GPT2-3.5B's 50,304
    backend = build("llguidance", tok, padded, replica.eos_id)
    m = backend.matcher(Constraint(json_schema={"type": "object", "properties": {"s": {"type": "string"}}}))
    bits = torch.zeros(1, (padded + 31) // 32, dtype=torch.int32)

    def allowed():
        backend.fill([m], [0], bits)
        return ((bits[:, :, None] >> torch.arange(32)) & 1).view(-1)[:padded].bool()

    for piece in ['{"s": "', "ab"]:  # inside the string: text may follow, EOS may not
        for t in replica.encode(piece):
            assert allowed()[t], piece
            assert m.consume(t)
        mask = allowed()
        assert not mask[replica.eos_id] and not mask[len(tok) :].any() and mask.sum() > 10
    for t in replica.encode('"}'):
        assert m.consume(t)
    mask = allowed()
    assert m.accepting() and mask[replica.eos_id] and mask.sum() == 1  # complete: only EOS


def test_samples_and_seeds_do_not_depend_on_what_runs_beside_them_or_on_preemption(replica):
    c = Constraint(json_schema=RECORD)
    params = GenerateParams(max_new_tokens=40, temperature=0.9, seed=7, num_return_sequences=3, constraint=c)

    def run(engine_params):
        out = generate(replica, PROMPTS, IDS, params, engine=LLMEngine(replica, params, engine_params))
        return [[(s.token_ids, s.constraint_satisfied) for s in r] for r in out]

    base = run(EngineParams(max_num_seqs=32))
    assert run(EngineParams(max_num_seqs=2)) == base
    model = replica.model
    per_block = 2 * model.n_layer * model.d * BLOCK * 4
    tight = EngineParams(max_num_seqs=16, cpu_kv_cache_gb=3 * (model.max_len // BLOCK) * per_block / 2**30)
    engine = LLMEngine(replica, params, tight)
    out = generate(replica, PROMPTS, IDS, params, engine=engine)
    assert [[(s.token_ids, s.constraint_satisfied) for s in r] for r in out] == base
    assert engine.stats.preemptions > 0
    # n > 1: each sample its own state (distinct records from one prompt, each valid on its own)
    assert all(len({tuple(t) for t, _ in row}) > 1 for row in base)


def test_a_limit_too_short_for_the_constraint_is_cut_never_dressed_as_valid(replica):
    long = Constraint(json_schema={"type": "object", "properties": {"essay": {"type": "string", "minLength": 40}},
                                   "required": ["essay"]})  # fmt: skip
    params = GenerateParams(max_new_tokens=6, temperature=0.8, seed=1, constraint=long)
    for (s,) in generate(replica, PROMPTS, IDS, params):
        assert s.finish_reason == "length" and s.constraint_satisfied is False and s.generated_tokens == 6
        head = '{"essay": "'
        assert s.generation.startswith(head) or head.startswith(s.generation)  # a record begun, never closed


@pytest.mark.parametrize(
    "constraint, message",
    [
        ({"json_schema": {"type": "strnig"}}, "json_schema is not a valid JSON Schema"),
        ({"regex": "(ab"}, "regex does not compile"),
        ({"grammar": "start: foo"}, "grammar does not compile"),
        ({"choice": []}, "choice"),
        ({"regex": "a", "choice": ["a"]}, "exactly one of"),
    ],
)
def test_a_bad_constraint_is_one_line_before_any_model_loads(tmp_path, constraint, message):
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps({"kind": "generate", "model": str(tmp_path / "no-such-model"), "input": "x",
                                "output": str(tmp_path / "out"), "constraint": constraint}))  # fmt: skip
    res = CliRunner().invoke(main, ["run", str(spec)])
    assert res.exit_code == 2 and message in res.output and "constraint" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and "no-such-model" not in res.output


def test_row_constraints_from_a_column():
    assert row_constraint(None) is None
    assert row_constraint('{"choice": ["a", "b"]}') == Constraint(choice=["a", "b"])
    assert row_constraint({"regex": "x+", "choice": None}) == Constraint(regex="x+")  # a struct column
    assert "not a JSON object" in row_constraint("{nope")
    assert "exactly one of" in row_constraint('{"regex": "a", "choice": ["a"]}')


def _prompts(path, constraints=None):
    rows = [{"id": f"p{i}", "prompt": p} for i, p in enumerate(PROMPTS)]
    if constraints is not None:
        for r, c in zip(rows, constraints, strict=True):
            r["constraint"] = c
    path.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), path / "p.parquet")
    return rows


@pytest.mark.usefixtures("ray_cluster")
def test_a_json_schema_job_from_the_cli_counts_valid_cut_and_failed(tmp_path, replica):
    _prompts(tmp_path / "in")
    (tmp_path / "record.json").write_text(json.dumps(RECORD))
    args = ["generate", "--model", str(replica.source), "--input", str(tmp_path / "in"), "--output",
            str(tmp_path / "out"), "--json-schema", str(tmp_path / "record.json"), "--num-return-sequences",
            "3", "--max-new-tokens", "24", "--temperature", "0.9", "--seed", "4"]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    rows = pq.read_table(tmp_path / "out" / "data").to_pylist()
    assert len(rows) == 3 * len(PROMPTS)
    for r in rows:
        assert r["constraint_satisfied"] == _valid(Constraint(json_schema=RECORD), r["generation"])
    valid = sum(r["constraint_satisfied"] for r in rows)
    cut = sum(not r["constraint_satisfied"] and r["finish_reason"] == "length" for r in rows)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["constraint"] == {"samples": len(rows), "satisfied": valid, "cut": cut,
                                                "failed": len(rows) - valid - cut}  # fmt: skip
    assert f"constraint satisfied by {valid} of {len(rows)} samples" in res.output
    assert manifest["spec"]["constraint"]["json_schema"] == RECORD  # the schema itself, not the file's path
    page = (tmp_path / "out" / "report" / "report.html").read_text()
    assert "cut by the token limit before complete" in page
    # rebuilt from the data files (by another column): the same constraint counts
    res = CliRunner().invoke(main, ["report", str(tmp_path / "out"), "--by", "finish_reason"])
    assert res.exit_code == 0, res.output
    rebuilt = json.loads((tmp_path / "out" / "report" / "summary.json").read_text())
    assert rebuilt["constraint"] == manifest["counts"]["constraint"]


@pytest.mark.usefixtures("ray_cluster")
def test_per_row_constraints_and_the_processor_equal_the_job(tmp_path, replica):
    import ray

    per_row = [json.dumps({"choice": ["yes", "no"]}), None, json.dumps({"regex": "[0-9]{3}"}), "{bad",
               json.dumps({"json_schema": RECORD}), json.dumps({"regex": "(x"})]  # fmt: skip
    rows = _prompts(tmp_path / "in", per_row)
    keys = dict(model=str(replica.source), max_new_tokens=30, temperature=0.8, seed=9, constraint_column="constraint",
                constraint={"choice": ["default"]})  # fmt: skip
    job = fb.run(
        fb.GenerateJob(input=str(tmp_path / "in"), output=str(tmp_path / "job"), **keys), progress=None
    )
    data = {r["id"]: r for r in pq.read_table(tmp_path / "job" / "data").to_pylist()}
    errors = {r["id"]: r for r in pq.read_table(tmp_path / "job" / "errors").to_pylist()}
    assert data["p0"]["generation"] in ("yes", "no") and data["p1"]["generation"] == "default"
    assert re.fullmatch("[0-9]{3}", data["p2"]["generation"])
    assert (
        _valid(Constraint(json_schema=RECORD), data["p4"]["generation"]) == data["p4"]["constraint_satisfied"]
    )
    assert {i: errors[i]["error_kind"] for i in errors} == {"p3": "bad_constraint", "p5": "bad_constraint"}
    assert "regex does not compile" in errors["p5"]["error_message"]
    assert job.counts["error_kinds"] == {"bad_constraint": 2}

    piped = fb.generate(ray.data.from_items(rows), batch_size=2, **keys).materialize()
    got = {r["id"]: r for r in piped.iter_rows() if r["error_kind"] is None}
    cols = ["generation", "finish_reason", "constraint_satisfied", "generation_nll_sum"]
    assert {i: [r[c] for c in cols] for i, r in got.items()} == {
        i: [r[c] for c in cols] for i, r in data.items()
    }


def test_constraint_settings_leave_older_generate_outputs_their_spec_hash():
    from fengshen_batch.io.outputs import spec_hash
    from fengshen_batch.spec import build_spec, spec_record

    fields = {"kind": "generate", "model": "m/", "input": "in/", "output": "out/"}
    record = spec_record(build_spec(fields))
    keys = ("constraint", "constraint_column", "constraint_backend")
    before = {k: v for k, v in record.items() if k not in keys}  # as a version without constraints wrote it
    assert spec_hash(record) == spec_hash(before)
    assert spec_hash(spec_record(build_spec({**fields, "constraint": {"choice": ["a"]}}))) != spec_hash(
        before
    )
