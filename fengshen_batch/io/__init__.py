"""Reading and writing where the data is: `storage` (fsspec filesystems, whole-file writes, redacted URLs),
`inputs` (Parquet inputs: footers, columns, shards, reading a shard), `portable` (Parquet every reader reads),
`writer` (a shard's data/ and errors/ files, written by the actor that computed them), `outputs` (the output
folder and its committer: markers, manifest.json, _SUCCESS)."""
