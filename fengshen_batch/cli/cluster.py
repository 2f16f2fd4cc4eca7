"""The `fengshen-batch` commands that talk to a Ray cluster's Jobs API: submit a spec, follow or stop it
(added to the main command in `cli/__init__.py`)."""

from __future__ import annotations

import sys

import click

from .. import api
from .options import report_errors

_ADDRESS = click.option(
    "--address",
    envvar="RAY_ADDRESS",
    required=True,
    help="Ray dashboard address of the cluster, e.g. http://HEAD:8265 (default: RAY_ADDRESS).",
)


@click.command()
@click.argument("spec_path", metavar="SPEC.yaml")
@_ADDRESS
@click.option("--wait", "wait_", is_flag=True, help="Follow the logs; exit 0 only if the job SUCCEEDED.")
@click.option(
    "--submission-id", help="Job id. Default: the spec's name and today's date (UTC), NAME-YYYYMMDD."
)
@click.option(
    "--package",
    type=click.Choice(["image", "py-modules", "pip"]),
    default="image",
    show_default=True,
    help="How fengshen-batch reaches the cluster: installed in its image (checked by a probe job first), "
    "this machine's copy as runtime_env py_modules, or runtime_env pip pinned to this machine's version.",
)
@click.option(
    "--working-dir",
    help="Also upload this folder as the job's working dir. Default: nothing is uploaded (the spec travels "
    "in the job's entrypoint).",
)
@report_errors
def submit(spec_path, address, wait_, submission_id, package, working_dir):
    """Submit a job spec, from anywhere, to a Ray cluster (Jobs API); a second submit of the same id does not
    run it again. Local paths in the spec are relative to its folder, and need a head on this machine."""
    sub = api.submit(spec_path, address, wait=wait_, submission_id=submission_id, working_dir=working_dir,
                     package=package, progress=click.echo)  # fmt: skip
    if wait_:
        click.echo(f"{sub.submission_id}: {sub.status}")
        sys.exit(0 if sub.status == "SUCCEEDED" else 1)


@click.command()
@click.argument("submission_id")
@_ADDRESS
@report_errors
def status(submission_id, address):
    """Status of a submitted job."""
    from ..submission import submit as jobs

    click.echo(jobs.status(address, submission_id))


@click.command()
@click.argument("submission_id")
@_ADDRESS
@report_errors
def logs(submission_id, address):
    """Logs of a submitted job."""
    from ..submission import submit as jobs

    click.echo(jobs.logs(address, submission_id), nl=False)


@click.command()
@click.argument("submission_id")
@_ADDRESS
@report_errors
def stop(submission_id, address):
    """Stop a submitted job."""
    from ..submission import submit as jobs

    click.echo("stop requested" if jobs.stop(address, submission_id) else "job was not running")


COMMANDS = [submit, status, logs, stop]
