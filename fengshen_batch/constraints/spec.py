"""What an output must look like: one constraint per job (`constraint:` in the spec) or per row (a column).

A `Constraint` names exactly one kind, with vLLM's structured-output names where they exist:
    choice       one of a list of strings ("positive", "negative", ...)
    regex        a regular expression the whole output matches (Rust `regex` syntax, anchored both ends)
    json_schema  a JSON Schema (inline, or a path/URL of a schema file read once, when the spec is built)
    grammar      a context-free grammar in Lark syntax (llguidance's variant) or GBNF (llama.cpp's)

It is backend-neutral: a backend (`backend.py`) compiles it for the model's tokenizer. Two things are pinned
here rather than left to a library's defaults, so that outputs do not change when a library does: JSON is
written with ", " and ": " separators and no other whitespace, and an object schema that does not say
whether it allows properties it does not name allows none (the record has the keys the loader expects).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

KINDS = ("choice", "regex", "json_schema", "grammar")
# JSON layout of generated records: json.dumps' default separators, no free whitespace
JSON_SEPARATORS = (", ", ": ")


class Constraint(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    choice: tuple[str, ...] | None = Field(default=None, min_length=1)
    regex: str | None = Field(default=None, min_length=1)
    json_schema: dict[str, Any] | bool | None = None
    grammar: str | None = Field(default=None, min_length=1)

    @field_validator("choice")
    @classmethod
    def _choices(cls, value):
        if value is not None and any(c == "" for c in value):
            raise ValueError("choice strings must not be empty")
        return value

    @field_validator("json_schema", mode="before")
    @classmethod
    def _schema(cls, value):
        """A dict is the schema; a string is its JSON text, or else a path/URL of a schema file."""
        if isinstance(value, str):
            value = read_schema(value)
        if isinstance(value, dict):
            import jsonschema

            validator = jsonschema.validators.validator_for(value, default=jsonschema.Draft202012Validator)
            try:
                validator.check_schema(value)
            except jsonschema.SchemaError as e:
                where = "/".join(str(p) for p in e.path)
                raise ValueError(
                    f"json_schema is not a valid JSON Schema: {e.message}"
                    + (f" (at {where})" if where else "")
                ) from None
        return value

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"a constraint names exactly one of {', '.join(KINDS)}"
                + (f"; got {', '.join(given)}" if given else "")
            )
        return self

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    def generation_schema(self) -> dict | bool:
        """The JSON Schema generation follows: the user's, with `additionalProperties: false` wherever an
        object schema leaves it unsaid (the validation after decoding uses the user's schema as given)."""
        return _closed(self.json_schema)


def _closed(node):
    if isinstance(node, list):
        return [_closed(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _closed(v) for k, v in node.items()}
    is_object = out.get("type") == "object" or "properties" in out
    if is_object and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out


def read_schema(text: str) -> dict | bool:
    """A schema from its JSON text, or from the file/URL `text` names (fsspec: local, s3://, gs://, https)."""
    stripped = text.strip()
    if stripped.startswith(("{", "[")) or stripped in ("true", "false"):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError as e:
            raise ValueError(f"json_schema is not valid JSON: {e}") from None
    import fsspec

    try:
        with fsspec.open(stripped, "r", encoding="utf-8") as f:
            raw = f.read()
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the json_schema file {stripped!r}: {e}") from None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"json_schema file {stripped!r} is not valid JSON: {e}") from None


def row_constraint(value: object) -> Constraint | None | str:
    """A row's constraint from its column: null -> None (the job's applies); a JSON object (text) or a
    struct with one of the kinds -> a Constraint; anything else -> the reason it is not one (a str)."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            return f"constraint is not a JSON object: {e}"
    if not isinstance(value, dict):
        return f"constraint must be an object with one of {', '.join(KINDS)}, got {type(value).__name__}"
    value = {k: v for k, v in value.items() if v is not None}  # a struct column holds every kind's field
    try:
        return Constraint(**value)
    except ValueError as e:
        return "constraint: " + _first_error(e)


def _first_error(e: ValueError) -> str:
    errors = getattr(e, "errors", None)
    if callable(errors):
        first = errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        return f"{loc}: {msg}" if loc else msg
    return str(e)
