"""Few-shot prompts built by the job: k worked examples drawn per row from an examples table, then the row's
own part (its prompt column, or `prompt_template` filled from its columns).

The draw is keyed, never stateful: which examples a row gets depends only on the job's seed, the row's id and
its stratum (`stratify_by`), so it is the same whatever the shard size, actor, cluster or rerun, and a row
never gets an example whose id is its own. Two ways to draw:
- `sets: N` (the cache-friendly one): per stratum, N example sets are cut from seeded permutations of the
  stratum's examples (every example is used once N x k reaches the stratum's size), and each row takes one
  set by its id. Rows that share a set share its header token for token, so the engine's prefix cache
  computes each header once per replica: N headers per stratum instead of one per row.
- no `sets`: k examples drawn for each row on its own (every prompt differs; the prefix cache serves little).
Each output row records `few_shot_ids` (the examples' ids, in prompt order), so a bad example can be traced
to the outputs it shaped; the pool's fingerprint is part of the job's identity (a changed pool is a
different job).
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass

import numpy as np

from .rows import RowError, fill_template


def _key(*parts: object) -> int:
    """A 64-bit key of the parts, the same in every process (Python's hash is salted per process)."""
    text = "\x00".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


@dataclass
class Pool:
    """The examples, formatted, by stratum (None: one stratum of them all)."""

    ids: list[str]
    texts: list[str]  # each example through `example_template`
    strata: dict[object, list[int]]  # stratum value -> indices of its examples, in id order
    fingerprint: str

    @classmethod
    def from_rows(cls, rows: list[dict], id_column: str, template: str, fields: list[str], by: str | None):
        """The pool from the examples table's rows; ValueError naming the first example that cannot be
        used (a null id, a repeated id, a null template field)."""
        ids, texts, strata, seen = [], [], {}, set()
        for n, row in enumerate(rows):
            rid = row.get(id_column)
            if rid is None:
                raise ValueError(f"example {n} has a null {id_column!r}")
            rid = str(rid)
            if rid in seen:
                raise ValueError(f"example id {rid!r} appears twice")
            seen.add(rid)
            text = fill_template(template, fields, row)
            if isinstance(text, RowError):
                raise ValueError(f"example {rid!r}: {text.message}")
            ids.append(rid)
            texts.append(text)
        order = sorted(range(len(ids)), key=lambda i: ids[i])
        for i in order:
            strata.setdefault(rows[i].get(by) if by else None, []).append(i)
        digest = hashlib.sha256()
        for i in order:
            digest.update(f"{ids[i]}\x1f{texts[i]}\x1f{rows[i].get(by) if by else ''}\x1e".encode())
        return cls(ids, texts, strata, digest.hexdigest()[:16])


def example_sets(
    indices: list[int], k: int, sets: int, seed: int, stratum: object, layout: str = "tree"
) -> list[list[int]]:
    """`sets` sets of k distinct examples from `indices`, drawn in order from seeded permutations of them (so
    every example is used once there are as many places as examples).

    `flat`: each set its own k draws (sets x k places). `tree`: sets share their leading examples, as the
    paths of a tree whose level p has about sets^((p + 1) / k) nodes (64 sets of 3: 4 first examples, 16
    second, 64 third: 84 places). Prompts are cached by their leading blocks, so a tree's sets share the
    K/V of their common first examples: a replica computes 84 examples' worth of headers instead of 192."""
    rng = np.random.default_rng(_key(seed, "sets", stratum))
    stream: list[int] = []

    def draw(forbidden: set[int]) -> int:
        nonlocal stream
        waiting = []  # drawn but not allowed here: first in line for the next place
        while True:
            if not stream:
                stream = [indices[j] for j in rng.permutation(len(indices))]
            x = stream.pop(0)
            if x not in forbidden:
                stream = waiting + stream
                return x
            waiting.append(x)

    if layout == "flat":
        out = []
        for _ in range(sets):
            chosen: list[int] = []
            for _ in range(k):
                chosen.append(draw(set(chosen)))
            out.append(chosen)
        return out
    widths = [sets if p == k - 1 else min(sets, math.ceil(sets ** ((p + 1) / k) - 1e-9)) for p in range(k)]
    out = [[] for _ in range(sets)]
    for width in widths:  # level by level, first examples first
        members: dict[int, list[int]] = {}  # node at this level -> the sets through it
        for j in range(sets):
            members.setdefault(j * width // sets, []).append(j)
        for node in sorted(members):
            x = draw({e for j in members[node] for e in out[j]})  # distinct from each set's earlier examples
            for j in members[node]:
                out[j].append(x)
    return out


# Routing needs this many distinct header prefixes per route, or some replicas would get (almost) no rows.
PREFIXES_PER_ROUTE = 4


class FewShotDraw:
    """Each row's examples and header, from the pool and the job's few_shot settings."""

    def __init__(self, pool: Pool, k: int, separator: str, seed: int, sets: int | None, layout: str = "tree"):
        self.pool, self.k, self.separator, self.seed = pool, k, separator, seed
        self.sets = (
            {s: example_sets(ix, k, sets, seed, s, layout) for s, ix in pool.strata.items() if len(ix) >= k}
            if sets
            else None
        )
        self._routes: dict[int, tuple[int, dict] | None] = {}

    def route_table(self, routes: int) -> tuple[int, dict] | None:
        """(depth, {(stratum, its first `depth` example ids): route}) for rows dealt among `routes` replicas
        by their header, or None (no sets, or too few headers to keep every replica busy).

        A replica's prefix cache computes each header block once, but two replicas compute it twice: routing
        each header to one replica halves that work on two (the headers of 2,000 rows over 256 sets: hit
        rate 0.79 -> 0.84). The key is the shallowest header prefix with PREFIXES_PER_ROUTE distinct values
        per route, so that sets sharing their first examples (the tree layout) share one replica's blocks;
        prefixes are dealt in turn in a fixed order (strata interleave evenly; no hashing imbalance)."""
        if routes not in self._routes:
            self._routes[routes] = None
            for depth in range(1, self.k + 1) if self.sets and routes > 1 else ():
                prefixes = sorted(
                    {(repr(s), tuple(self.pool.ids[i] for i in c[:depth])) for s, sets in self.sets.items() for c in sets}
                )  # fmt: skip
                if len(prefixes) >= PREFIXES_PER_ROUTE * routes:
                    self._routes[routes] = depth, {p: n % routes for n, p in enumerate(prefixes)}
                    break
        return self._routes[routes]

    def route(self, row_id: str, stratum: object, routes: int) -> int:
        """The row's route of `routes` (a row without examples: route 0, where its error is written)."""
        depth, table = self.route_table(routes) or (0, {})
        chosen = self.examples(row_id, stratum)
        if isinstance(chosen, RowError) or not depth:
            return 0
        return table.get((repr(stratum), tuple(self.pool.ids[i] for i in chosen[:depth])), 0)

    def examples(self, row_id: str, stratum: object) -> list[int] | RowError:
        """Indices of the row's k examples, in prompt order, or why it has none."""
        pool = self.pool
        indices = pool.strata.get(stratum)
        own = [i for i in indices or [] if pool.ids[i] != row_id]
        if len(own) < self.k:
            have = len(own)
            return RowError(
                "few_shot_too_few",
                f"stratum {stratum!r} has {have} example{'s' * (have != 1)} besides the row's own id; k is {self.k}",
            )
        if self.sets is not None:
            options = self.sets[stratum]
            first = _key(self.seed, "row", row_id, stratum) % len(options)
            for j in range(len(options)):  # the row's set, or the next one without its own id
                chosen = options[(first + j) % len(options)]
                if all(pool.ids[i] != row_id for i in chosen):
                    return chosen
        rng = np.random.default_rng(_key(self.seed, "row", row_id, stratum))
        return [own[j] for j in rng.choice(len(own), self.k, replace=False)]

    def header(self, chosen: list[int]) -> str:
        return self.separator.join(self.pool.texts[i] for i in chosen) + self.separator


def read_pool(fs_spec, storage) -> Pool:
    """The examples table of a job's `few_shot`, read and formatted; SpecError naming what is missing."""
    import pyarrow.parquet as pq

    from ..errors import SpecError
    from ..io.storage import filesystem

    fields = fs_spec.template_columns()
    try:
        fs, path = filesystem(fs_spec.examples, storage)
        table = pq.read_table(path, filesystem=fs)
    except (OSError, ValueError) as e:
        raise SpecError(f"few_shot.examples: cannot read {fs_spec.examples!r} as Parquet: {e}") from None
    wanted = [fs_spec.id_column, *fields, *([fs_spec.stratify_by] if fs_spec.stratify_by else [])]
    missing = [c for c in dict.fromkeys(wanted) if c not in table.column_names]
    if missing:
        raise SpecError(
            f"few_shot.examples {fs_spec.examples!r} has no column {missing[0]!r} "
            f"(its columns: {', '.join(table.column_names[:20])})"
        )
    try:
        return Pool.from_rows(
            table.select(list(dict.fromkeys(wanted))).to_pylist(), fs_spec.id_column,
            fs_spec.example_template, fields, fs_spec.stratify_by,
        )  # fmt: skip
    except ValueError as e:
        raise SpecError(f"few_shot.examples: {e}") from None


def draw_for(spec) -> FewShotDraw:
    """The job's draw, its pool read once per process (every batch an actor runs uses the same)."""
    return _draw(spec.few_shot.model_dump_json(), spec.storage.model_dump_json(), spec.seed)


@functools.lru_cache(maxsize=4)
def _draw(few_shot: str, storage: str, job_seed: int) -> FewShotDraw:
    from ..spec import FewShot, StorageSpec  # rebuilt from their JSON: the cache keys are strings

    fs = FewShot.model_validate_json(few_shot)
    return new_draw(fs, read_pool(fs, StorageSpec.model_validate_json(storage)), job_seed)


def new_draw(fs, pool: Pool, job_seed: int) -> FewShotDraw:
    """The draw of a job's `few_shot` settings over its pool (`few_shot.seed`, else the job's)."""
    return FewShotDraw(pool, fs.k, fs.separator, job_seed if fs.seed is None else fs.seed, fs.sets, fs.layout)


def check_pool(spec, pool: Pool, tokenizer, context: int) -> None:
    """Before any model loads: strata with fewer than k examples (unless their rows may fail), and headers
    that leave no room for a row's part and the job's max_new_tokens."""
    from ..errors import SpecError

    fs = spec.few_shot
    short = {s: len(ix) for s, ix in pool.strata.items() if len(ix) < fs.k}
    if short and fs.too_few == "fail":
        s, n = next(iter(short.items()))
        raise SpecError(
            f"few_shot: stratum {s!r} of {fs.stratify_by or 'the examples'} has {n} examples, fewer than k={fs.k} "
            "(few_shot.too_few: row_error makes its rows errors instead)"
        )
    lengths = [len(tokenizer.encode(t)) for t in pool.texts]
    sep = len(tokenizer.encode(fs.separator))
    draw = new_draw(fs, pool, spec.seed)
    if draw.sets is not None:
        longest = max(sum(lengths[i] + sep for i in chosen) for sets in draw.sets.values() for chosen in sets)
    else:
        longest = max(
            sum(sorted((lengths[i] for i in ix), reverse=True)[: fs.k]) + fs.k * sep
            for ix in pool.strata.values()
            if len(ix) >= fs.k
        )
    room = context - spec.max_new_tokens - 1  # a row's part needs a token at least
    if longest > room:
        raise SpecError(
            f"few_shot: the longest header is about {longest} tokens; with max_new_tokens={spec.max_new_tokens} "
            f"at most {room} fit the model's context of {context} with a row's part: a smaller k, shorter "
            "examples or a smaller max_new_tokens"
        )
