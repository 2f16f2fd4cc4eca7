"""Near-duplicate dedup (`dedup:`): signatures against exact Jaccard, clusters against an independent
union-find, and jobs through the CLI: planted near-copies found across shards and actors, unrelated texts
and shared templates not merged, survivors, drop exactly once under resume, `against` an earlier output,
the report."""

from __future__ import annotations

import itertools
import json
import random
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from fengshen_batch.cli import main
from fengshen_batch.dedup.clusters import components, node_key, survivors
from fengshen_batch.dedup.minhash import estimated_jaccard, exact_jaccard, is_cjk, signatures
from fengshen_batch.errors import SpecError
from fengshen_batch.spec import build_spec
from tests.helpers import DEDUP_EN, DEDUP_ZH, near_copies

PLANTS = DEDUP_ZH + DEDUP_EN


def _planted() -> tuple[list[str], list[int]]:
    """Every planted sentence and its two near-copies, interleaved with the others' so that a group's
    members land in different shards; the group of each text."""
    texts, groups = [], []
    for copy in range(3):
        for g, t in enumerate(PLANTS):
            texts.append([t, *near_copies(t)][copy])
            groups.append(g)
    return texts, groups


# ------------------------------------------------------------------------------------------ signatures


def test_signatures_estimate_exact_jaccard_in_both_scripts():
    assert is_cjk(DEDUP_ZH[0]) and not is_cjk(DEDUP_EN[0]) and is_cjk("我们用 Python 写了一个程序")
    pairs = [(t, c) for t in PLANTS for c in near_copies(t)] + list(itertools.combinations(PLANTS, 2))
    sigs = signatures([x for p in pairs for x in p], ngram=3, num_perm=256)
    est = estimated_jaccard(sigs[0::2], sigs[1::2])
    exact = np.array([exact_jaccard(x, y, 3) for x, y in pairs])
    assert (exact[: 2 * len(PLANTS)] >= 0.76).all()  # the plants' premise: near-copies are near
    assert (exact[2 * len(PLANTS) :] <= 0.05).all()  # and distinct sentences are not
    # 256 permutations: one standard deviation of the estimate is at most 0.031
    assert np.abs(est - exact).max() <= 0.12 and abs((est - exact).mean()) <= 0.02


def test_json_records_compare_by_their_values_not_their_schemas_keys():
    """Records of one schema share every key: over short values, signatures of the whole text would merge
    unrelated records (marin #6851). Their values alone are compared; a record cut short is text."""
    keys = ["overall customer satisfaction rating from one to five", "primary product category of the order",
            "recommended follow up action for the support team"]  # fmt: skip
    values = [["4", "kitchen appliances", "call back"], ["2", "garden tools", "send refund"],
              ["5", "office furniture", "no action"], ["3", "children books", "offer discount"]]  # fmt: skip
    records = [json.dumps(dict(zip(keys, v, strict=True)), ensure_ascii=False) for v in values]
    as_text = ["note: " + r for r in records]  # the same characters, not a record: keys and all
    sigs = signatures(records + as_text, ngram=3, num_perm=256)
    n = len(records)
    pairs = list(itertools.combinations(range(n), 2))
    with_keys = [exact_jaccard(as_text[i], as_text[j], 3) for i, j in pairs]
    assert min(with_keys) >= 0.45  # the keys alone make every pair look alike
    assert max(exact_jaccard(records[i], records[j], 3) for i, j in pairs) == 0.0
    assert max(estimated_jaccard(sigs[[i]], sigs[[j]])[0] for i, j in pairs) <= 0.1
    # the same values under other keys, with other whitespace: one record
    same = json.dumps({"rating": 4, "category": "kitchen appliances", "action": "call back"}, indent=2)
    assert estimated_jaccard(signatures([same], 3, 256), sigs[[0]])[0] == 1.0
    assert exact_jaccard(records[0][:-5], records[0][:-5], 3) == 1.0  # cut short: compared as text
    assert exact_jaccard(records[0][:-5], records[1][:-5], 3) >= 0.45


def test_signatures_are_the_same_in_another_process():
    """Shards are signed by different actors on different machines and nights: no per-process hashing."""
    code = "from fengshen_batch.dedup.minhash import signatures; import sys; sys.stdout.write(signatures(sys.argv[1:], 3, 64).tobytes().hex())"  # noqa: E501
    texts = [DEDUP_ZH[0], DEDUP_EN[0], ""]
    out = subprocess.run([sys.executable, "-c", code, *texts], capture_output=True, text=True, check=True)
    assert out.stdout == signatures(texts, 3, 64).tobytes().hex()


# ------------------------------------------------------------------------------------------ clusters


def _reference_components(u, v) -> dict[int, int]:
    """Node -> smallest node of its component, by breadth-first search over an adjacency dict."""
    adj: dict[int, set[int]] = {}
    for a, b in zip(u.tolist(), v.tolist(), strict=True):
        adj.setdefault(a, set()).add(b)
        adj.setdefault(b, set()).add(a)
    root, seen = {}, set()
    for start in sorted(adj):
        if start in seen:
            continue
        comp, todo = [], [start]
        seen.add(start)
        while todo:
            n = todo.pop()
            comp.append(n)
            for m in adj[n] - seen:
                seen.add(m)
                todo.append(m)
        for n in comp:
            root[n] = min(comp)
    return root


@pytest.mark.parametrize("seed", range(5))
def test_components_equal_breadth_first_search(seed):
    rng = np.random.default_rng(seed)
    n = 300
    u, v = rng.integers(0, n, 250), rng.integers(0, n, 250)  # chains, stars and cycles of random sizes
    keys = node_key(0, 3, np.arange(n)) + rng.integers(0, 2, n) * (1 << 32)  # two shards
    nodes, roots = components(keys[u], keys[v])
    ref = _reference_components(keys[u], keys[v])
    assert dict(zip(nodes.tolist(), roots.tolist(), strict=True)) == ref


def test_survivors_one_per_cluster_by_policy_and_none_beside_an_earlier_output():
    k = node_key(0, 0, np.arange(6))
    earlier = node_key(1, 0, np.array([0]))
    nodes = np.sort(np.concatenate([k, earlier]))  # this run's 0..5, then the earlier output's sample
    roots = np.array([k[0], k[0], k[0], k[3], k[3], k[5], k[5]])  # {0,1,2} {3,4} {5, earlier}
    nll = np.array([3.0, 1.0, np.nan, 2.0, 2.0, 1.0, 0.5])
    length = np.array([5, 9, 9, 1, 2, 7, 7])
    assert survivors(nodes, roots, nll, length, "first").tolist() == [1, 0, 0, 1, 0, 0, 0]
    assert survivors(nodes, roots, nll, length, "lowest_nll").tolist() == [0, 1, 0, 1, 0, 0, 0]
    assert survivors(nodes, roots, nll, length, "longest").tolist() == [0, 1, 0, 0, 1, 0, 0]


# ------------------------------------------------------------------------------------------ jobs


def _write(folder, texts, ids=None, files=2):
    folder.mkdir(parents=True, exist_ok=True)
    ids = ids or [f"r{i:03d}" for i in range(len(texts))]
    step = -(-len(texts) // files)
    for f in range(files):
        sl = slice(f * step, (f + 1) * step)
        pq.write_table(pa.table({"id": ids[sl], "text": texts[sl]}), folder / f"part-{f}.parquet")
    return dict(zip(ids, texts, strict=True))


def _run(tmp_path, name, fields) -> dict:
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(yaml.safe_dump(fields, allow_unicode=True))
    res = CliRunner().invoke(main, ["run", str(spec)])
    assert res.exit_code == 0, res.output
    return json.loads((tmp_path / name / "manifest.json").read_text())


def _score(replica, tmp_path, **extra) -> dict:
    return {"kind": "score", "model": str(replica.source), "input": str(tmp_path / "in"), "actors": 2,
            "shard_rows": 5, "stride": 32, **extra}  # fmt: skip


def _rows(path) -> dict[str, dict]:
    return {r["id"]: r for r in pq.read_table(path).to_pylist()} if path.exists() else {}


@pytest.mark.usefixtures("ray_cluster")
def test_partitioned_tasks_find_the_pairs_an_unpartitioned_pass_finds(tmp_path, monkeypatch):
    """The band, bucket and join tasks at many partitions (tiny per-task limits) against the driver's own
    pass over the same signature files: every pair sharing a band, kept at the threshold, in components;
    two runs (this one and an earlier output), several files each."""
    from types import SimpleNamespace

    from fengshen_batch.dedup.clusters import run_of
    from fengshen_batch.dedup.config import Dedup
    from fengshen_batch.dedup.minhash import band_keys, sig_array, signature_table
    from fengshen_batch.spec import StorageSpec
    from fengshen_batch.workers import dedup as tasks

    d = Dedup(threshold=0.7)
    rng = random.Random(3)
    texts = [t for base in DEDUP_ZH + DEDUP_EN for t in (base, *near_copies(base))]
    rng.shuffle(texts)
    outputs = []
    for run, chunk in enumerate((texts[: len(texts) // 2], texts[len(texts) // 2 :])):
        folder = tmp_path / f"run{run}"
        folder.mkdir()
        paths = []
        for shard in range(3):
            part = chunk[shard::3]
            table = signature_table(shard, part, [rng.random() for _ in part], d.signature_settings())
            paths.append(str(folder / f"part-{shard:06d}.parquet"))
            pq.write_table(table, paths[-1])
        outputs.append((str(folder), paths))
    spec = SimpleNamespace(dedup=d, storage=StorageSpec(), shard_rows=len(texts) // 6)

    # the reference, on the driver: every pair that shares a band key, confirmed, then components
    keys, sigs = [], []
    for run, (_, paths) in enumerate(outputs):
        for path in paths:
            t = pq.read_table(path)
            keys.append(t.column("key").to_numpy() | np.int64(run << 56))
            sigs.append(sig_array(t.column("sig"), d.num_perm))
    keys, sigs = np.concatenate(keys), np.concatenate(sigs)
    bands = band_keys(sigs, d.bands)
    pairs = {(min(keys[i], keys[j]), max(keys[i], keys[j])) for i, j in itertools.combinations(range(len(keys)), 2)
             if (bands[i] == bands[j]).any() and estimated_jaccard(sigs[i : i + 1], sigs[j : j + 1])[0] >= d.threshold}  # fmt: skip
    u, v = np.array(sorted(pairs)).T
    nodes, roots = components(u, v)
    expected = {int(k): int(r) for k, r in zip(nodes, roots, strict=True) if run_of(np.array([k]))[0] == 0}

    ref, figures = tasks.near_duplicates(spec, outputs)
    assert figures["examples"] and all(ex["texts"] for ex in figures["examples"])
    monkeypatch.setattr(tasks, "BAND_ROWS_PER_PARTITION", 200)  # 6 band partitions
    monkeypatch.setattr(tasks, "JOIN_BYTES_PER_PARTITION", 4000)  # 5 key partitions
    many_ref, many = tasks.near_duplicates(spec, outputs)
    import ray

    for table in (ray.get(ref), ray.get(many_ref)):
        got = dict(zip(table.column("key").to_pylist(), table.column("cluster").to_pylist(), strict=True))
        assert got == expected
    # each bucket pairs its smallest key with the rest (a star), so fewer pairs than all, the same components
    assert figures == many and 0 < figures["confirmed_pairs"] <= len(pairs)
    assert figures["matched_earlier"] > 0  # copies split across the two runs were found too


@pytest.mark.usefixtures("ray_cluster")
def test_planted_near_copies_cluster_across_shards_and_actors_and_nothing_else(tmp_path, replica):
    texts, groups = _planted()
    unrelated = ["一只小猫在窗台上晒太阳。", "Quarterly revenue rose by four percent.", "明天下雨。"]
    by_id = _write(tmp_path / "in", texts + unrelated)
    fields = _score(replica, tmp_path, output=str(tmp_path / "mark"), dedup={"keep": "longest"})
    manifest = _run(tmp_path, "mark", fields)
    rows = _rows(tmp_path / "mark" / "data")
    assert len(rows) == len(by_id) and manifest["counts"]["duplicate_rows"] == 2 * len(PLANTS)
    group_of = {f"r{i:03d}": g for i, g in enumerate(groups)}
    clusters: dict[int, set[str]] = {}
    for rid, r in rows.items():
        if r["dup_cluster"] is not None:
            clusters.setdefault(r["dup_cluster"], set()).add(rid)
        else:
            assert r["dup_keep"] and rid not in group_of  # only the unrelated texts are alone
    # each planted group is one cluster: its members came from different files, shards and actors
    assert sorted(map(sorted, clusters.values())) == sorted(
        sorted(r for r, g in group_of.items() if g == k) for k in range(len(PLANTS))
    )
    for members in clusters.values():
        kept = [m for m in members if rows[m]["dup_keep"]]
        longest = max(len(by_id[m]) for m in members)
        assert len(kept) == 1 and len(by_id[kept[0]]) == longest  # keep: longest
    d = manifest["dedup"]
    assert d["clusters"] == len(PLANTS) and d["cluster_sizes"] == {"3": len(PLANTS)} and d["removed"] == 24
    page = (tmp_path / "mark" / "report" / "report.html").read_text()
    assert "Near-duplicates" in page and f"{24 / len(by_id):.1%}" in page and DEDUP_ZH[0][:10] in page
    if shutil.which("chromium"):  # the cluster-size bars draw: the page against itself without the section
        _bars_drawn(tmp_path, page)


def _bars_drawn(tmp_path, page: str) -> None:
    from PIL import Image

    from tests.helpers import screenshot

    start, end = page.index("<section id='near-duplicates'>"), page.index("</section>") + len("</section>")
    blue = []
    for name, html in (("with", page), ("without", page[:start] + page[end:])):
        (tmp_path / f"{name}.html").write_text(html)
        shot = tmp_path / f"{name}.png"
        res = screenshot(tmp_path / f"{name}.html", shot, tmp_path / f"profile-{name}", "1200,4000")
        assert res.returncode == 0, res.stderr[-2000:]
        pixels = Image.open(shot).convert("RGB").getdata()
        blue.append(sum(abs(r - 0x3B) + abs(g - 0x6E) + abs(b - 0xA5) < 40 for r, g, b in pixels))
    assert blue[0] - blue[1] >= 200 * 14, blue  # the one bar of 12 clusters of 3: 240 x 14 pixels


@pytest.mark.usefixtures("ray_cluster")
def test_drop_puts_each_sample_in_one_folder_exactly_once_under_resume(tmp_path, replica):
    texts, _ = _planted()
    by_id = _write(tmp_path / "in", texts)
    _run(tmp_path, "mark", _score(replica, tmp_path, output=str(tmp_path / "mark"), dedup={}))
    marked = _rows(tmp_path / "mark" / "data")
    drop = _score(replica, tmp_path, output=str(tmp_path / "drop"), dedup={}, dedup_output="drop")
    _run(tmp_path, "drop", drop)
    out = tmp_path / "drop"
    kept, gone = _rows(out / "data"), _rows(out / "duplicates")
    assert kept.keys() | gone.keys() == by_id.keys() and not kept.keys() & gone.keys()
    assert {k for k, r in marked.items() if r["dup_keep"]} == kept.keys()  # drop moves what mark marks
    # a run killed between a shard's duplicates/ and data/ rewrite (its data file still as the actor wrote
    # it), with another shard not yet committed: the rerun finishes both, each sample once
    (out / "_SUCCESS").unlink()
    (out / "manifest.json").unlink()
    original = pq.read_table(tmp_path / "mark" / "data" / "part-000001.parquet").drop_columns(
        ["dup_cluster", "dup_keep"]
    )
    pq.write_table(original, out / "data" / "part-000001.parquet")
    (out / "_markers" / "part-000003.json").unlink()
    _run(tmp_path, "drop", drop)
    assert _rows(out / "data") == kept and _rows(out / "duplicates") == gone


@pytest.mark.usefixtures("ray_cluster")
def test_against_an_earlier_output_marks_tonights_repeats(tmp_path, replica):
    _write(tmp_path / "in", DEDUP_ZH[:3] + DEDUP_EN[:3], files=1)
    _run(tmp_path, "week1", _score(replica, tmp_path, output=str(tmp_path / "week1"), dedup={}))
    # tonight: near-copies of two of last week's texts, and new ones
    tonight = [near_copies(DEDUP_ZH[0])[0], near_copies(DEDUP_EN[1])[1], *DEDUP_ZH[3:], *DEDUP_EN[3:]]
    shutil.rmtree(tmp_path / "in")
    _write(tmp_path / "in", tonight, ids=[f"n{i}" for i in range(len(tonight))])
    fields = _score(replica, tmp_path, output=str(tmp_path / "week2"),
                    dedup={"against": [str(tmp_path / "week1")]}, dedup_output="drop")  # fmt: skip
    manifest = _run(tmp_path, "week2", fields)
    assert set(_rows(tmp_path / "week2" / "duplicates")) == {"n0", "n1"}
    assert len(_rows(tmp_path / "week2" / "data")) == len(tonight) - 2
    assert manifest["dedup"]["matched_earlier"] == 2
    assert (
        "repeat a sample of an earlier output" in (tmp_path / "week2" / "report" / "report.html").read_text()
    )
    # an earlier output signed another way does not compare: refused before any model loads
    fields["dedup"] = {"against": [str(tmp_path / "week1")], "ngram": 5}
    fields["output"] = str(tmp_path / "week2b")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(fields))
    res = CliRunner().invoke(main, ["run", str(tmp_path / "bad.yaml")])
    assert res.exit_code != 0 and '"ngram": 3' in res.output and "do not compare" in res.output
    assert not (tmp_path / "week2b").exists()


@pytest.mark.usefixtures("ray_cluster")
def test_generate_dedups_generations_not_their_shared_template(tmp_path, replica):
    """Prompts of one long template: sampled answers stay apart; one prompt's greedy samples are one text."""
    rng = random.Random(0)
    topics = [f"topic {rng.randrange(10**6)}" for _ in range(8)]
    (tmp_path / "in").mkdir()
    pq.write_table(
        pa.table({"id": [f"p{i}" for i in range(8)], "topic": topics}), tmp_path / "in" / "a.parquet"
    )
    common = {"kind": "generate", "model": str(replica.source), "input": str(tmp_path / "in"), "actors": 1,
              "prompt_template": "Please write one short answer about the following subject: {topic}.",
              "max_new_tokens": 24, "num_return_sequences": 3, "ignore_eos": True, "dedup": {}}  # fmt: skip
    sampled = _run(tmp_path, "sampled", {**common, "output": str(tmp_path / "sampled"), "temperature": 1.0})
    rows = pq.read_table(tmp_path / "sampled" / "data").to_pylist()
    gens = [r["generation"] for r in rows]
    near = {
        (i, j)
        for i, j in itertools.combinations(range(len(gens)), 2)
        if exact_jaccard(gens[i], gens[j], 3) >= 0.5
    }
    assert not near and sampled["dedup"]["removed"] == 0  # the prompts share most of their words
    assert all(r["dup_cluster"] is None and r["dup_keep"] for r in rows)
    _run(tmp_path, "greedy", {**common, "output": str(tmp_path / "greedy"), "greedy": True})
    rows = pq.read_table(tmp_path / "greedy" / "data").to_pylist()
    for pid in {r["id"] for r in rows}:
        mine = [r for r in rows if r["id"] == pid]
        assert len({r["dup_cluster"] for r in mine}) == 1 and [r["dup_keep"] for r in mine] == [
            True,
            False,
            False,
        ]


def test_bad_dedup_settings_fail_before_anything_runs(tmp_path):
    base = {"kind": "score", "model": "m", "input": "i", "output": str(tmp_path / "o")}
    for extra, message in [
        ({"dedup": {"num_perm": 100, "bands": 32}}, "must divide"),
        ({"dedup_output": "drop"}, "needs dedup"),
        ({"dedup": {"near": False}}, "near"),
        ({"dedup": {"keep": "best"}}, "keep"),
    ]:
        with pytest.raises(SpecError, match=message):
            build_spec({**base, **extra})
    with pytest.raises(SpecError, match="dedup"):
        build_spec({**base, "kind": "judge", "answers_column": "a", "dedup": {}})
