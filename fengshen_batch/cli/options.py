"""The command line's shared options: job options, baseline options, and how CLI options become spec fields.

`cli.py` holds the commands; this module the decorators they share, so each command reads as its own options
plus these.
"""

from __future__ import annotations

import functools
import logging
import sys

import click

from ..errors import FengshenError, JobInterrupted
from ..io.redact import install_log_redaction, redact_text
from ..io.spec_files import fill_dates


def report_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, debug: bool = False, **kwargs):
        install_log_redaction()
        logging.basicConfig(
            level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(message)s"
        )
        try:
            return fn(*args, **kwargs)
        except FengshenError as e:
            if debug:
                raise
            click.echo(f"error: {redact_text(str(e))}", err=True)
            sys.exit(2)
        except JobInterrupted as e:  # Ctrl-C mid-run: how far it got, and that a rerun resumes
            click.echo(str(e), err=True)
            sys.exit(130)
        except KeyboardInterrupt:  # before any shard ran (checks, Ray starting, the model loading)
            click.echo(
                "interrupted before this run committed any shard; rerun the same command to resume", err=True
            )
            sys.exit(130)

    return click.option("--debug", is_flag=True, help="Show tracebacks for errors.")(wrapper)


RAY_PROGRESS = click.option(
    "--ray-progress",
    is_flag=True,
    help="Also show Ray Data's own progress bars and INFO lines (off: one progress line of the job's).",
)


TOKEN_LOGPROBS = click.option(
    "--token-logprobs",
    is_flag=True,
    default=None,
    help="Write token_ids and token_logprobs (natural log, temperature 1) columns. Large: off by default.",
)


def job_options(fn):
    options = [
        click.option(
            "--model", required=True, help="Model: local dir, s3://... (any fsspec) prefix, or hub id."
        ),
        click.option(
            "--input",
            "input_",
            required=True,
            help="Parquet file, folder/prefix or glob (local, s3://, gs://).",
        ),
        click.option(
            "--output", required=True, help="Output folder/prefix: data/, errors/, manifest.json, _SUCCESS."
        ),
        click.option("--id-column", help="Row id column. Default: `id` if present, else FILE:ROW."),
        click.option(
            "--name", help="Job name (a-z, 0-9, -): the `job` tag of its Ray metrics. Default: the kind."
        ),
        click.option(
            "--drop-column",
            "drop_columns",
            multiple=True,
            help="Leave this input column out of the job and its output (e.g. an old `ppl`). Repeatable.",
        ),
        click.option(
            "--result-prefix",
            help="Prefix of every result column (new_ -> new_ppl, ...), e.g. beside an input's old results.",
        ),
        click.option("--actors", help="Model replicas: N, or MIN,MAX to autoscale. Default 1."),
        click.option(
            "--gpus-per-actor",
            type=float,
            help="GPUs per replica. Default 1 if the cluster has GPUs, else 0 (CPU).",
        ),
        click.option(
            "--cpus-per-actor",
            type=float,
            help="CPUs per replica (a CPU replica uses as many torch threads). Default 1.",
        ),
        click.option(
            "--batch-size",
            type=int,
            help="Scoring, judging: rows per engine call within a shard. Default 256.",
        ),
        click.option(
            "--token-budget",
            type=int,
            help="Scoring: padded tokens per forward pass (default 16384 on GPU, 2048 on CPU). Generation: "
            "prompt tokens prefilled per engine step (default 8192 on GPU, 2048 on CPU).",
        ),
        click.option(
            "--dtype",
            type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
            help="Weights dtype. auto: bf16 on GPUs that have it, fp16 on others, fp32 on CPU.",
        ),
        click.option(
            "--shard-rows", type=int, help="Input rows per output shard (the unit of resume). Default 4096."
        ),
        click.option(
            "--address", help="Ray cluster to join. Default: RAY_ADDRESS, else an embedded local Ray."
        ),
        click.option("--endpoint-url", help="S3-compatible endpoint (else AWS_ENDPOINT_URL / AWS config)."),
        click.option("--region", help="Object-store region."),
        click.option("--anonymous", is_flag=True, default=None, help="Unsigned requests (public buckets)."),
        click.option(
            "--trust-remote-code",
            is_flag=True,
            default=None,
            help="Allow model code from the model repo. Off unless given.",
        ),
        click.option(
            "--on-input-change",
            type=click.Choice(["fail", "recompute"]),
            help="A rerun whose input files changed since shards were committed: fail naming them (default), "
            "or recompute the shards they touched.",
        ),
        click.option(
            "--overwrite",
            is_flag=True,
            help="Recompute everything, replacing a finished or different output.",
        ),
        RAY_PROGRESS,
        click.option(
            "--plan",
            "plan_only",
            is_flag=True,
            help="Print what would run (rows, shards, tokens, an estimate of time and GPU-hours) and stop: "
            "nothing starts, no model loads.",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def spec_fields(kind: str, opts: dict) -> dict:
    """CLI options -> spec fields; options not given stay out so the spec's defaults apply."""
    storage = {k: opts.pop(k) for k in ("endpoint_url", "region", "anonymous")}
    fields = {"kind": kind, "input": opts.pop("input_"), **opts}
    fields = {k: v for k, v in fields.items() if v is not None and v != ()}
    for key in ("input", "output", "baseline"):  # {date}, {date-1}: as in a YAML spec
        if key in fields:
            fields[key] = fill_dates(fields[key])
    if "reuse" in fields:
        fields["reuse"] = [fill_dates(url) for url in fields["reuse"]]
    storage = {k: v for k, v in storage.items() if v is not None}
    if storage:
        fields["storage"] = storage
    return fields


def _drift_threshold(ctx, param, value: str | None):
    """`0.05` (a corpus-perplexity change) or `ppl_change=0.05,ks=0.1,min_group_rows=500`."""
    if value is None:
        return None
    try:
        if "=" not in value:
            return float(value)
        pairs = (part.split("=", 1) for part in value.split(","))
        return {k.strip(): (int if k.strip() == "min_group_rows" else float)(v) for k, v in pairs}
    except ValueError:
        raise click.BadParameter("give a number (0.05) or KEY=VALUE pairs (ppl_change=0.05,ks=0.1)") from None


_BASELINE_OPTIONS = [
    click.option(
        "--baseline",
        help="An earlier score job's output to compare with, e.g. s3://scores/{date-1}/ (its report and "
        "markers are read, never its rows).",
    ),
    click.option(
        "--baseline-check/--no-baseline-check",
        default=None,
        help="Refuse a baseline scored with another model, tokenizer or stride (default), or compare anyway.",
    ),
    click.option(
        "--drift-threshold",
        callback=_drift_threshold,
        help="Exit 3 (output complete) past this: a corpus-perplexity change (0.05 = 5%) or "
        "ppl_change=0.05,bpb_change=0.05,ks=0.1,volume_change=0.2,min_group_rows=1000 (bpb: bits per byte; "
        "KS distance; report_by groups of that size count too).",
    ),
]
REUSE_OPTIONS = [
    click.option(
        "--reuse",
        multiple=True,
        help="An earlier score output whose results unchanged texts take, e.g. s3://scores/{date-1}/ (repeat "
        "for several; the first listed is looked in first): only the other rows reach the model.",
    ),
    click.option(
        "--reuse-mismatch",
        type=click.Choice(["fail", "skip"]),
        help="A --reuse output scored with other settings, or not there: refuse the job (default) or skip it.",
    ),
]


def baseline_options(fn):
    for option in reversed(_BASELINE_OPTIONS):
        fn = option(fn)
    return fn


def reuse_options(fn):
    for option in reversed(REUSE_OPTIONS):
        fn = option(fn)
    return fn
