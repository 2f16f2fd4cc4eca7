"""Jobs sent to a Ray cluster's Jobs API: `plan` (no network), `client` (the API), `probe` (the image check),
`submit` (submit, wait, status, logs, stop)."""
