"""The driver of a job: `checks` (everything before Ray starts, and the plan of shards), `commit` (the shards
through the actors, each committed as it arrives), `finish` (manifest, the kind's finish step, _SUCCESS),
`display` (what the user sees meanwhile), `run` (the phases in order: `run_job`)."""
