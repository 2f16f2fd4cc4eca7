"""Reading a job spec's fields: YAML files, `--set` overrides and the `{date}` placeholders a nightly spec
uses. Validation is `spec.build_spec`'s; this module only turns text into the dict it validates."""

from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path

import yaml

from ..errors import SpecError


def run_date() -> str:
    """The date a scheduled run is for: FENGSHEN_RUN_DATE (YYYY-MM-DD) if set, else today in UTC."""
    value = os.environ.get("FENGSHEN_RUN_DATE") or dt.datetime.now(dt.timezone.utc).date().isoformat()
    try:
        dt.date.fromisoformat(value)
    except ValueError:
        raise SpecError(f"FENGSHEN_RUN_DATE must be YYYY-MM-DD, got {value!r}") from None
    return value


_DATE = re.compile(r"\{date(?:-(\d+))?\}")


def fill_dates(text: str, date: str | None = None) -> str:
    """`{date}` -> the run date (`run_date()` unless given), `{date-N}` -> N days before it (YYYY-MM-DD):
    a nightly spec's own prefix and its baseline's, e.g. `s3://scores/{date-1}/`."""
    day = dt.date.fromisoformat(date or run_date())
    return _DATE.sub(lambda m: (day - dt.timedelta(days=int(m.group(1) or 0))).isoformat(), text)


def apply_overrides(fields: dict, pairs: tuple[str, ...] | list[str]) -> dict:
    """`run --set KEY=VALUE`: each pair replaces one spec key (`storage.endpoint_url=...` a nested one); the
    value is read as YAML (`8`, `true`, `[a, b]`, `null`), with `{date}` filled in, and checked with the
    rest of the spec by `build_spec`."""
    fields = dict(fields)
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        keys = [k.strip() for k in key.split(".")]
        if not sep or not all(keys):
            raise SpecError(
                f"--set wants a spec key and a value joined by '=' (e.g. output=s3://bucket/out/), got {pair!r}"
            )
        try:
            value = yaml.safe_load(fill_dates(raw)) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = fields
        for k in keys[:-1]:
            inner = node.get(k)
            if inner is not None and not isinstance(inner, dict):
                raise SpecError(f"--set {key}: {k} is not a mapping in this spec")
            node[k] = node = dict(inner or {})
        node[keys[-1]] = value
    return fields


def read_spec_fields(path: str | Path) -> dict:
    """A YAML spec's fields, dates filled in, not yet validated (`build_spec` does that)."""
    try:
        fields = yaml.safe_load(fill_dates(Path(path).read_text(encoding="utf-8")))
    except OSError as e:
        raise SpecError(f"cannot read job spec {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise SpecError(f"job spec {path} is not valid YAML: {e}") from None
    if not isinstance(fields, dict):
        raise SpecError(f"job spec {path} must be a mapping of fields, got {type(fields).__name__}")
    return fields
