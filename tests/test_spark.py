"""A real Spark round trip: a corpus Spark wrote with its defaults is scored, generated from and judged, and
Spark (no legacy flags), DuckDB and Polars read every output back with the input's types and values."""

from __future__ import annotations

import datetime as dt
import decimal
import shutil

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyspark.sql import SparkSession
from pyspark.sql import types as T

from fengshen_batch.job.run import run_job
from fengshen_batch.spec import build_spec

SCHEMA = T.StructType([
    T.StructField("id", T.StringType()), T.StructField("text", T.StringType()),
    T.StructField("source", T.StringType()), T.StructField("crawled", T.TimestampType()),
    T.StructField("price", T.DecimalType(10, 2)), T.StructField("tags", T.ArrayType(T.StringType())),
    T.StructField("meta", T.StructType([T.StructField("lang", T.StringType()), T.StructField("len", T.IntegerType())])),
    T.StructField("attrs", T.MapType(T.StringType(), T.IntegerType())),
    T.StructField("choices", T.ArrayType(T.StringType())),
])  # fmt: skip
PASSTHROUGH = ["crawled", "price", "tags", "meta", "attrs"]


@pytest.fixture(scope="module")
def spark():
    if not shutil.which("java"):
        pytest.fail(
            "the Spark round trip needs a Java 17+ runtime (Debian: apt-get install openjdk-17-jre-headless)"
        )
    session = (
        SparkSession.builder.master("local[1]").appName("fengshen-batch-tests")
        .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.ui.enabled", "false").config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.shuffle.partitions", "1").getOrCreate()
    )  # fmt: skip
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture(scope="module")
def corpus(spark, tmp_path_factory):
    """60 rows written by Spark's defaults: partitionBy("source"), snappy, INT96 timestamps (with
    microseconds), a decimal, an array, a struct, a map, `_SUCCESS` and `.crc` files; 20 null or empty texts."""
    rows = []
    for i in range(60):
        text = (
            None if i % 6 == 0 else "" if i % 6 == 1 else f"北京是中国的首都。Row {i}: the patient recovered."
        )
        rows.append((f"r{i:02d}", text, f"s{i % 3}", dt.datetime(2026, 11, 1, 12, i % 60, i % 60, 1000 * i + 7),
                     decimal.Decimal(f"{i}.25"), [f"t{i}", "x"], ("zh", i), {"a": i, "b": -i},
                     ["Beijing is the capital of China.", "Shanghai is the capital of China."]))  # fmt: skip
    path = tmp_path_factory.mktemp("spark") / "corpus"
    spark.createDataFrame(rows, SCHEMA).write.partitionBy("source").parquet(str(path))
    assert (path / "_SUCCESS").exists() and list(path.glob("source=s0/.*.crc"))
    physical = pq.ParquetFile(next(path.glob("source=s0/*.parquet"))).schema
    assert physical.column(2).physical_type == "INT96"  # Spark's default, the case that broke
    return path


def _check(spark, corpus, out, n_data: int, results: dict[str, T.DataType]) -> None:
    """Spark reads data/ and errors/ with no legacy flag: rows, ids, passthrough values equal to the input's
    (timestamps as timestamps), result columns typed as documented; DuckDB and Polars read the same files."""
    source = spark.read.parquet(str(corpus))
    data, errors = spark.read.parquet(str(out / "data")), spark.read.parquet(str(out / "errors"))
    assert data.count() == n_data and errors.count() == 20
    assert {r.id for r in errors.collect()} == {f"r{i:02d}" for i in range(60) if i % 6 < 2}
    for name in PASSTHROUGH:
        assert data.schema[name].dataType == source.schema[name].dataType, name
    assert isinstance(data.schema["crawled"].dataType, T.TimestampType)
    for name, kind in results.items():
        assert data.schema[name].dataType == kind, (name, data.schema[name].dataType)
    cols = ["id", "source", *PASSTHROUGH]
    want = {r.id: r.asDict(recursive=True) for r in source.select(*cols).collect()}
    for frame in (data, errors):  # every passthrough value equal to the corpus row of its id
        for row in frame.select(*cols).collect():
            assert row.asDict(recursive=True) == want[row.id], row.id
    files = str(out / "data" / "*.parquet")
    assert duckdb.sql(f"select count(*) from read_parquet('{files}')").fetchall()[0][0] == n_data
    kind = duckdb.sql(f"select typeof(crawled) from read_parquet('{files}') limit 1").fetchall()[0][0]
    assert kind.startswith("TIMESTAMP"), kind
    frame = pl.read_parquet(files)
    assert frame.height == n_data and isinstance(frame.schema["crawled"], pl.Datetime)
    assert frame.schema["price"] == pl.Decimal(10, 2)


@pytest.mark.usefixtures("ray_cluster")
def test_spark_reads_every_output_of_a_spark_corpus(spark, corpus, tmp_path, replica):
    base = {"model": replica.source, "input": str(corpus), "shard_rows": 7}
    run_job(build_spec({**base, "kind": "score", "output": str(tmp_path / "score"), "report_by": "source",
                        "token_logprobs": True}), progress=lambda _: None)  # fmt: skip
    _check(spark, corpus, tmp_path / "score", 40, {"ppl": T.DoubleType(), "token_count": T.LongType(),
           "token_logprobs": T.ArrayType(T.FloatType()), "token_ids": T.ArrayType(T.IntegerType())})  # fmt: skip
    run_job(build_spec({**base, "kind": "generate", "output": str(tmp_path / "generate"), "prompt_column": "text",
                        "num_return_sequences": 2, "max_new_tokens": 8, "seed": 1, "token_logprobs": True}),
            progress=lambda _: None)  # fmt: skip
    _check(spark, corpus, tmp_path / "generate", 80, {"generation": T.StringType(), "sample_index": T.IntegerType(),
           "token_logprobs": T.ArrayType(T.FloatType()), "generated_tokens": T.IntegerType()})  # fmt: skip
    run_job(build_spec({**base, "kind": "judge", "output": str(tmp_path / "judge"), "question_column": "text",
                        "candidates_column": "choices"}), progress=lambda _: None)  # fmt: skip
    judged = spark.read.parquet(str(tmp_path / "judge" / "data"))
    assert judged.count() + spark.read.parquet(str(tmp_path / "judge" / "errors")).count() == 60
    assert judged.schema["candidate_ppl"].dataType == T.ArrayType(T.DoubleType())
    assert isinstance(judged.schema["crawled"].dataType, T.TimestampType)


@pytest.mark.usefixtures("ray_cluster")
def test_a_resumed_output_with_an_older_versions_shards_reads_as_one(spark, corpus, tmp_path, replica):
    fields = {"kind": "score", "model": replica.source, "input": str(corpus), "output": str(tmp_path / "out"),
              "shard_rows": 7}  # fmt: skip
    first = run_job(build_spec(fields), progress=lambda _: None)
    # what an older version left: nanosecond timestamps without a zone in two committed shards, one shard
    # uncommitted, no _SUCCESS
    for name in ("part-000000.parquet", "part-000002.parquet"):
        for folder in ("data", "errors"):
            path = tmp_path / "out" / folder / name
            table = pq.read_table(path)
            i = table.schema.get_field_index("crawled")
            pq.write_table(table.set_column(i, "crawled", table.column(i).cast(pa.timestamp("ns"))), path)
    (tmp_path / "out" / "_markers" / "part-000001.json").unlink()
    for name in ("_SUCCESS", "manifest.json"):
        (tmp_path / "out" / name).unlink()
    shutil.rmtree(tmp_path / "out" / "report")
    lines: list[str] = []
    again = run_job(build_spec(fields), progress=lines.append)
    assert again["resumed_shards"] == first["shards"] - 1  # the same spec: no refusal
    assert any("rewrote 4 files" in line for line in lines), lines
    _check(spark, corpus, tmp_path / "out", 40, {"ppl": T.DoubleType()})
