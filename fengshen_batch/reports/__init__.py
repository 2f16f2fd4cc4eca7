"""What a person reads when a job ends, built from mergeable per-shard summaries (never a pass over the output):

histograms.py       mergeable histograms and their quantiles, the building block of every summary
score_sketch.py     a score job's shard summary (sums, ppl / bits-per-byte histograms, examples, groups)
generate_sketch.py  a generate job's shard summary (lengths, finish reasons, NLL, duplicates, loops, examples)
distinct.py         exact-then-HyperLogLog distinct counts (duplicates, distinct-n)
summaries.py        the shards' summaries merged, or the data files' where those do not fit
score_report.py     OUTPUT/report/ of a score job (summary.json, histogram, HTML)
generate_report.py  OUTPUT/report/ of a generate job
baseline.py         comparison with an earlier output's sketch, and drift against thresholds
buckets.py          CCNet head/middle/tail buckets by perplexity
"""
