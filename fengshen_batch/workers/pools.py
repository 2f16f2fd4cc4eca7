"""The Ray Data pipelines: shards -> model actors -> commit records (a job), and a user's Dataset -> row actors
(the processors).

    from_items(shards) --map_batches(ModelActor, actor pool, 1 GPU each, one shard per call)-->
        the actor reads its shard (io.inputs.read_shard), runs its kind's work on id + text in slices of
        `batch_size` rows (generation: the whole shard into the engine), writes the shard's data/ and errors/
        files (io.writer)
    --> one small commit record per shard --iter_batches--> the driver, which writes the shard's marker

Shards routed by header (few-shot `sets`, `Shard.route`) go through one such pipeline per route, each with
its own share of the replicas, unioned: a route's rows always meet the same replicas' prefix caches.

Data moves where the data is: rows, texts and passthrough columns go from storage to the actor that
computes on them and back to storage, never through the object store or the driver (whose memory is
O(shards)). Several shards are in flight in one actor (threaded calls): for generation they feed its one
engine, which admits the next shard's prompts as the current one's sequences finish; for scoring and judging
one shard computes while the next is read (or the last written).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict

import pyarrow as pa
import ray

from ..io.inputs import Shard
from ..kinds import get
from ..spec import GenerateJob, ScoreJob
from .actors import ModelActor, RowsActor

SHARDS_IN_FLIGHT = 2  # scoring and judging, per actor: one computing, one being read or written


def _compute(spec: ScoreJob | GenerateJob, actors: tuple[int, int] | None = None):
    """The actor pool (of `actors`, default the spec's). A batch job wants every replica it may have from
    the start; the pool shrinks to `min` when idle. Several calls run in each actor at once (threads):
    generate jobs `max_concurrent_batches` into one engine (a whole-shard kind); the other kinds
    SHARDS_IN_FLIGHT, so that reading and writing shards overlaps the model's work instead of leaving the
    device idle."""
    lo, hi = actors or spec.actors
    sizes = {"size": lo} if lo == hi else {"min_size": lo, "max_size": hi, "initial_size": hi}
    k = spec.max_concurrent_batches if get(spec.kind).whole_shard else SHARDS_IN_FLIGHT
    if k == 1:
        return ray.data.ActorPoolStrategy(**sizes)
    return ray.data.ActorPoolStrategy(
        **sizes,
        max_tasks_in_flight_per_actor=k,
        max_concurrent_calls_per_actor=k,
        enable_true_multi_threading=True,
    )


def map_rows(ds: ray.data.Dataset, spec, gpus: float) -> ray.data.Dataset:
    """`ds` through RowsActor pool of `spec.actors` replicas (lazy, as Ray Data is)."""
    return ds.map_batches(
        RowsActor,
        batch_size=spec.batch_size,
        batch_format="pyarrow",
        fn_constructor_kwargs={"spec": spec.model_dump(mode="json")},
        compute=_compute(spec),
        num_gpus=gpus,
        num_cpus=spec.cpus_per_actor,
    )


def run_pipeline(
    spec: ScoreJob | GenerateJob,
    shards: list[Shard],
    id_column: str | None,
    gpus: float,
    output: str,
    schemas: tuple[pa.Schema, pa.Schema],
    ray_progress: bool = False,
    board=None,
    model_versions: dict | None = None,
) -> Iterator[pa.Table]:
    """Stream commit records (COMMIT_SCHEMA, one row per shard written under `output`) to the driver; the
    actors post their in-flight counts to `board` (`start_board`).

    Ray Data's progress bars only with `ray_progress`: the job draws its own progress line."""
    ray.data.DataContext.get_current().enable_progress_bars = ray_progress
    kwargs = {
        "spec": spec.model_dump(mode="json"),
        "id_column": id_column,
        "output": output,
        "schemas": schemas,
        "board": board,
        "model_versions": model_versions,
    }

    def pipeline(part: list[Shard], actors: tuple[int, int] | None = None) -> ray.data.Dataset:
        ds = ray.data.from_items([asdict(s) for s in part], override_num_blocks=max(1, len(part)))
        return ds.map_batches(
            ModelActor,
            batch_size=1,  # one shard per call: the unit of writing, retry and commit
            batch_format="pyarrow",
            fn_constructor_kwargs=kwargs,
            compute=_compute(spec, actors),
            num_gpus=gpus,
            num_cpus=spec.cpus_per_actor,
        )

    routes = shards[0].routes if shards else 1
    lo, hi = spec.actors
    if routes > 1 and lo == hi >= routes:
        # Rows routed by header: each route's shards on its own pool (a fixed share of the replicas), so
        # a header's K/V is computed on one replica, not on every one; the pools run side by side.
        size = hi // routes
        groups = [g for r in range(routes) if (g := [s for s in shards if s.route == r])]
        parts = [pipeline(g, (size, size)) for g in groups]  # a resumed route with nothing left: no pool
        ds = parts[0].union(*parts[1:])
    else:  # one pool (also a rerun of a routed output on fewer replicas: the same rows, any replica)
        ds = pipeline(shards)
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")
