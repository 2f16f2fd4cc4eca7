"""Parquet the rest of a corpus pipeline reads as written: Spark (3.x and 4.x), DuckDB, pandas/pyarrow, Polars.

Our outputs carry the input's columns through, so they carry its types, and Arrow holds some that Parquet
readers disagree on. Each output file is written in the form the widest set of readers accepts, losslessly:
- timestamps with nanoseconds (what pyarrow makes of Spark's default INT96 timestamps) become microseconds,
  Parquet TIMESTAMP(MICROS), which every reader reads as a timestamp; Spark refuses TIMESTAMP(NANOS)
  (PARQUET_TYPE_ILLEGAL without its legacy nanosAsLong flag, which turns them into longs). A file with a
  timestamp that has a sub-microsecond part keeps its nanoseconds as INT96 instead, which Spark, DuckDB,
  Polars and pyarrow all read as timestamps: never a lost digit;
- a column that was INT96 in the input is a UTC instant (Spark writes INT96 normalised to UTC), so it is
  written with isAdjustedToUTC=true and Spark reads it back as the TimestampType it read from the input (a
  timestamp without a zone would come back as TIMESTAMP_NTZ in Spark 3.4+): `mark_int96` at input time;
- unsigned integers become the next wider signed type (uint64: decimal(20, 0)): Spark before 3.2 refuses
  unsigned Parquet types, and no Spark has an unsigned type to give them;
- decimals, lists, structs, maps, dictionary columns, dates and our own result columns are written as Arrow
  has them: every reader above reads them.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

_WIDER = {
    pa.uint8(): pa.int16(),
    pa.uint16(): pa.int32(),
    pa.uint32(): pa.int64(),
    pa.uint64(): pa.decimal128(20, 0),
}


def portable_type(t: pa.DataType) -> pa.DataType:
    """`t` as our files store it (see the module), nested types field by field."""
    if pa.types.is_timestamp(t) and t.unit == "ns":
        return pa.timestamp("us", t.tz)
    if t in _WIDER:
        return _WIDER[t]
    if pa.types.is_struct(t):
        return pa.struct([f.with_type(portable_type(f.type)) for f in t])
    if pa.types.is_map(t):
        return pa.map_(portable_type(t.key_type), portable_type(t.item_type), t.keys_sorted)
    if pa.types.is_large_list(t):
        return pa.large_list(t.value_field.with_type(portable_type(t.value_type)))
    if pa.types.is_list(t):
        return pa.list_(t.value_field.with_type(portable_type(t.value_type)))
    if pa.types.is_fixed_size_list(t):
        return pa.list_(t.value_field.with_type(portable_type(t.value_type)), t.list_size)
    if pa.types.is_dictionary(t):
        return pa.dictionary(t.index_type, portable_type(t.value_type), t.ordered)
    return t


def portable_schema(schema: pa.Schema) -> pa.Schema:
    return pa.schema([f.with_type(portable_type(f.type)) for f in schema], metadata=schema.metadata)


def write_portable(table: pa.Table, sink) -> None:
    """Write `table` to `sink` as one Parquet file in the portable form (see the module)."""
    target = portable_schema(table.schema)
    if target == table.schema:
        pq.write_table(table, sink)
        return
    try:
        table = table.cast(target)  # safe: raises rather than drop a sub-microsecond digit
    except pa.ArrowInvalid:
        # nanoseconds that matter: INT96 keeps them and every reader above reads it; only the other
        # columns change
        keep = pa.schema(
            [
                f if pa.types.is_timestamp(f.type) else f.with_type(portable_type(f.type))
                for f in table.schema
            ],
            metadata=table.schema.metadata,
        )
        pq.write_table(table.cast(keep), sink, use_deprecated_int96_timestamps=True)
        return
    pq.write_table(table, sink)


def mark_int96(schema: pa.Schema, parquet_schema: pq.ParquetSchema) -> pa.Schema:
    """The Arrow schema of a Parquet file with its top-level INT96 columns as UTC instants (what they are:
    Spark and Hive write INT96 normalised to UTC; pyarrow reads them without a zone)."""
    int96 = {
        parquet_schema.column(i).path
        for i in range(len(parquet_schema))
        if parquet_schema.column(i).physical_type == "INT96"
    }
    fields = [
        f.with_type(pa.timestamp(f.type.unit, "UTC"))
        if f.name in int96 and pa.types.is_timestamp(f.type) and f.type.tz is None
        else f
        for f in schema
    ]
    return pa.schema(fields, metadata=schema.metadata)


def is_portable(parquet_schema: pq.ParquetSchema) -> bool:
    """Whether a written file is in the portable form: no TIMESTAMP(NANOS) and no unsigned integer column
    (files of older versions may have them; INT96 is fine)."""
    for i in range(len(parquet_schema)):
        logical = parquet_schema.column(i).logical_type
        if logical.type == "TIMESTAMP" and '"nanoseconds"' in logical.to_json():
            return False
        if logical.type == "INT" and '"isSigned":false' in logical.to_json():
            return False
    return True
