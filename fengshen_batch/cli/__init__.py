"""The `fengshen-batch` command: score, generate, run SPEC.yaml, demo.

Options become a job spec (the same fields as a YAML spec), validated before Ray starts. User errors (a bad
spec, input, model or output) print one line and exit 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import sys

import click

from .. import __version__, api
from ..io.spec_files import apply_overrides, fill_dates, read_spec_fields
from ..spec import build_spec
from . import cluster
from .options import (
    RAY_PROGRESS,
    TOKEN_LOGPROBS,
    baseline_options,
    job_options,
    report_errors,
    reuse_options,
    spec_fields,
)


def _run(fields: dict, overwrite: bool, ray_progress: bool, plan_only: bool = False) -> None:
    spec = build_spec(fields)
    if plan_only:
        _show_plan(spec)
        return
    _exit_on_drift(api.run(spec, progress=click.echo, overwrite=overwrite, ray_progress=ray_progress))


def _show_plan(spec) -> None:
    for line in api.plan(spec).lines():
        click.echo(line)


def _exit_on_drift(result: api.JobResult) -> None:
    """A drifted score job is complete, but a scheduler must see it: exit DRIFT_EXIT_CODE. The job printed
    its breaches; a retry that found it complete says them again (a drifted night stays red)."""
    _exit_if_drifted(result.manifest.get("drift"), say=result.already_complete)


def _exit_if_drifted(drift: dict | None, say: bool = True) -> None:
    if drift and drift.get("exceeded"):
        from ..reports.baseline import DRIFT_EXIT_CODE

        if say:
            click.echo("drift: " + "; ".join(drift["breaches"]), err=True)
        sys.exit(DRIFT_EXIT_CODE)


SET = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Replace one spec key for this run, e.g. --set output=s3://b/out/ --set actors=4 (a YAML value; "
    "storage.endpoint_url=... for a nested one). Repeatable.",
)


def _spec(spec_path: str, overrides: tuple[str, ...]):
    return build_spec(apply_overrides(read_spec_fields(spec_path), overrides))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="fengshen-batch", message="%(prog)s %(version)s")
def main():
    """Offline batch scoring and generation for the Fengshenbang GPT2-3.5B models on Ray."""


@main.command()
@job_options
@click.option("--text-column", help="Column holding the text to score. Default `text`.")
@click.option("--report-by", help="Break the report's figures down by this column (e.g. source).")
@click.option(
    "--stride",
    type=int,
    help="New tokens scored per window after the first (default: the model context, lm-eval's windows). Smaller: more context per token, more compute.",
)
@click.option(
    "--reference-model",
    help="Also score every text with this model (any --model source): ref_* columns and bpb_diff "
    "(Moore-Lewis filtering).",
)
@click.option(
    "--bucket-by",
    type=click.Choice(["ppl", "bits_per_byte", "bpb_diff"]),
    help="The column buckets cut (with bucket_quantiles/bucket_thresholds in a spec). Default ppl.",
)
@TOKEN_LOGPROBS
@baseline_options
@reuse_options
@report_errors
def score(overwrite, ray_progress, plan_only, **opts):
    """Perplexity of every text (lm-eval loglikelihood_rolling semantics)."""
    _run(spec_fields("score", opts), overwrite, ray_progress, plan_only)


@main.command()
@job_options
@click.option(
    "--prompt-column",
    help="Column holding the prompt (with --prompt-template: the column the filled prompt is written to). "
    "Default `prompt`.",
)
@click.option(
    "--prompt-template",
    help="Build each prompt from the row's columns, Python format syntax: 'Write a {style} article about "
    "{topic}.' ({{ }} for literal braces). A null in a named column is that row's error.",
)
@click.option(
    "--keep-prompt/--no-keep-prompt",
    default=None,
    help="With --prompt-template: write the filled prompt to the output (default) or not.",
)
@click.option("--report-by", help="Break the report's figures down by this column (e.g. source).")
@click.option(
    "--keep-best",
    type=int,
    help="Keep the K of --num-return-sequences samples with the lowest NLL per token (best-of-n).",
)
@TOKEN_LOGPROBS
@click.option("--max-new-tokens", type=int, help="Tokens to generate at most. Default 64.")
@click.option(
    "--max-new-tokens-column",
    help="Integer column of per-row limits (null: --max-new-tokens); a bad value is that row's error.",
)
@click.option(
    "--max-num-seqs",
    type=int,
    help="Sequences decoding at once per replica. Default: what the KV cache budget holds, at most 256.",
)
@click.option(
    "--gpu-memory-utilization",
    type=float,
    help="Fraction of GPU memory for weights, activations and KV cache. Default 0.90.",
)
@click.option("--cpu-kv-cache-gb", type=float, help="CPU replicas: GiB for the KV cache. Default 2.")
@click.option(
    "--prefix-caching/--no-prefix-caching",
    "enable_prefix_caching",
    default=None,
    help="Reuse cached K/V of shared prompt prefixes (few-shot headers, templates). Default on.",
)
@click.option(
    "--max-concurrent-batches",
    type=int,
    help="Ray batches in flight per replica, feeding its one engine. Default 4.",
)
@click.option(
    "--greedy",
    is_flag=True,
    default=None,
    help="Greedy decoding (equal to HF generate with do_sample=False).",
)
@click.option("--temperature", type=float, help="Sampling temperature, >= 0 (0 = greedy). Default 1.0.")
@click.option("--top-p", type=float, help="Nucleus sampling, in (0, 1]. Default 1.0 (off).")
@click.option("--top-k", type=int, help="Top-k sampling, >= 0. Default 0 (off).")
@click.option("--repetition-penalty", type=float, help="> 0; 1.0 (default) is off.")
@click.option("--num-return-sequences", type=int, help="Samples per prompt, one output row each. Default 1.")
@click.option("--stop", multiple=True, help="Stop string; the text is cut before it. Repeatable.")
@click.option(
    "--ignore-eos", is_flag=True, default=None, help="Always generate --max-new-tokens (fixed-length output)."
)
@click.option(
    "--seed", type=int, help="Job seed: a sample depends only on it, the row id and the sample index."
)
@click.option(
    "--prompt-too-long",
    type=click.Choice(["truncate_left", "error"]),
    help="Prompt longer than context - max_new_tokens: keep its end (default) or a row error.",
)
@click.option("--choice", multiple=True, help="Constraint: the output is one of these strings. Repeatable.")
@click.option("--regex", help="Constraint: the whole output matches this regular expression.")
@click.option(
    "--json-schema", help="Constraint: a JSON record valid under this schema (JSON text, or a file/URL)."
)
@click.option("--grammar", help="Constraint: a Lark or GBNF grammar (its text, or @FILE).")
@click.option(
    "--constraint-column",
    help='Column of per-row constraints, e.g. {"choice": ["yes", "no"]}; null takes the job\'s.',
)
@report_errors
def generate(overwrite, ray_progress, plan_only, choice, regex, json_schema, grammar, **opts):
    """Generate continuations of every prompt."""
    if grammar and grammar.startswith("@"):
        grammar = _read_text(grammar[1:], "--grammar")
    given = {"choice": list(choice) or None, "regex": regex, "json_schema": json_schema, "grammar": grammar}
    given = {k: v for k, v in given.items() if v is not None}
    if len(given) > 1:
        raise click.UsageError(
            f"give one constraint, not {' and '.join('--' + k.replace('_', '-') for k in given)}"
        )
    if given:
        opts["constraint"] = given
    _run(spec_fields("generate", opts), overwrite, ray_progress, plan_only)


def _read_text(path: str, option: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise click.BadParameter(f"cannot read {path}: {e.strerror}", param_hint=option) from None


@main.command()
@job_options
@click.option("--candidates-column", help="List<string> column of ready candidate statements.")
@click.option("--question-column", help="Question column (with --answers-column). Default `question`.")
@click.option(
    "--answers-column", help="List<string> column of candidate answers, made into statements by --template."
)
@click.option(
    "--template",
    help="`auto` (built-in English/Chinese rules, the default) or a format string with {question} and {answer}.",
)
@click.option(
    "--criterion",
    type=click.Choice(["ppl", "nll", "bpb"]),
    help="Lower wins: per-token perplexity (default), total NLL, or bits per byte.",
)
@click.option("--label-column", help="Correct candidate (index or text): accuracy goes into the manifest.")
@click.option(
    "--threshold",
    type=float,
    help="With one statement per row: judged true when its criterion value <= this.",
)
@click.option("--stride", type=int, help="As for score: new tokens per window after the first.")
@click.option("--report-by", help="Break the report's accuracy down by this column (e.g. source).")
@report_errors
def judge(overwrite, ray_progress, plan_only, **opts):
    """Judge facts by perplexity (Yuyuan): the least surprising candidate statement wins."""
    _run(spec_fields("judge", opts), overwrite, ray_progress, plan_only)


@main.command()
@click.argument("output")
@click.option("--by", help="Break the figures down by this column (e.g. source).")
@click.option("--endpoint-url", help="S3-compatible endpoint (else AWS_ENDPOINT_URL / AWS config).")
@baseline_options
@report_errors
def report(output, by, endpoint_url, baseline, baseline_check, drift_threshold):
    """Rebuild OUTPUT/report/ (summary.json, histograms, report.html) from a finished score, generate or judge job;
    a score job's is compared with its baseline (or --baseline), exit 3 when it drifted past the threshold."""
    baseline = fill_dates(baseline) if baseline else None
    summary = api.report(output, by=by, endpoint_url=endpoint_url, baseline=baseline,
                         baseline_check=baseline_check, drift_threshold=drift_threshold)  # fmt: skip
    if "corpus_ppl" in summary:
        headline = f"corpus ppl {summary['corpus_ppl']:,.2f}"
    elif "per_criterion" in summary:  # a judge job's
        acc = summary["accuracy"]
        headline = f"{summary['rows']:,} rows judged" + ("" if acc is None else f", accuracy {acc:.1%}")
    else:
        headline = f"{summary['samples']:,} samples, {summary['limit_hit_fraction'] or 0:.1%} hit the limit"
    click.echo(f"report: {output.rstrip('/')}/report/report.html ({headline})")
    _exit_if_drifted(summary.get("drift"))


@main.command()
@click.argument("spec_path", metavar="SPEC.yaml")
@SET
@report_errors
def plan(spec_path, overrides):
    """What SPEC.yaml would run, without starting Ray or loading a model: input files, rows, shards (and those
    already committed), tokens from a sample with the job's truncation, the prefix cache's share, and an
    estimate of compute time and GPU-hours from measured rates. `score|generate|judge ... --plan` does the
    same for options."""
    _show_plan(_spec(spec_path, overrides))


@main.command()
@click.argument("output")
@click.option("-n", "rows", type=int, default=10, show_default=True, help="Rows to show.")
@click.option("--errors", is_flag=True, help="The errors/ rows (error_kind, error_message) instead of data/.")
@click.option("--columns", help="Comma-separated columns to show. Default: all.")
@click.option("--endpoint-url", help="S3-compatible endpoint (else AWS_ENDPOINT_URL / AWS config).")
@report_errors
def head(output, rows, errors, columns, endpoint_url):
    """The first rows of OUTPUT's data (or errors) as JSON lines, long values cut: a look at what a job wrote,
    finished or still running. Reads only the shard files those rows are in."""
    import json

    table = api.head(output, rows, errors=errors, endpoint_url=endpoint_url,
                     columns=[c.strip() for c in columns.split(",")] if columns else None)  # fmt: skip

    def cut(value):
        if isinstance(value, str) and len(value) > HEAD_CHARS:
            return value[:HEAD_CHARS] + f"... ({len(value):,} chars)"
        if isinstance(value, list) and len(value) > HEAD_ITEMS:
            return [*value[:HEAD_ITEMS], f"... ({len(value):,} items)"]
        return value

    for row in table.to_pylist():
        click.echo(json.dumps({k: cut(v) for k, v in row.items()}, ensure_ascii=False, default=str))


HEAD_CHARS, HEAD_ITEMS = 200, 8  # `head`: longer strings and lists are cut


@main.command()
@click.argument("spec_path", metavar="SPEC.yaml")
@SET
@click.option(
    "--overwrite", is_flag=True, help="Recompute everything, replacing a finished or different output."
)
@RAY_PROGRESS
@report_errors
def run(spec_path, overrides, overwrite, ray_progress):
    """Run a job spec (kind: score|generate|judge, and the options above as snake_case keys)."""
    spec = _spec(spec_path, overrides)
    _exit_on_drift(api.run(spec, progress=click.echo, overwrite=overwrite, ray_progress=ray_progress))


@main.command()
@click.option(
    "--output", default="demo-output", show_default=True, help="Where the demo writes its model and results."
)
@click.option("--address", help="Ray cluster to join. Default: an embedded local Ray.")
@report_errors
def demo(output, address):
    """Build a tiny GPT2 and sample prompts, then score and generate on Ray, and show the results."""
    from .demo import run_demo

    run_demo(output, address, echo=click.echo)


for _command in cluster.COMMANDS:
    main.add_command(_command)
