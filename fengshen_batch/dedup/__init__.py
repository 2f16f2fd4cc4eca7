"""Near-duplicate samples: MinHash signatures (`minhash`), clusters of confirmed pairs (`clusters`), and the
spec's `dedup:` settings (`config`). Pure numpy and pyarrow: the Ray stages that run them over a whole output
are in `workers/dedup.py`."""
