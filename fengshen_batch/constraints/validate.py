"""The check of a finished output against its constraint, independent of the backend that produced it.

The matcher's verdict (did the output end in an accepting state) comes first; a JSON output is then also
parsed and validated against the user's schema as given (`jsonschema`), and a choice compared with its list,
so that a backend's bug or a library's changed default shows as `constraint_satisfied: false`, never as a
half-record dressed as valid.
"""

from __future__ import annotations

import json

from .spec import Constraint


def satisfied(constraint: Constraint, text: str, accepting: bool) -> bool:
    if not accepting:
        return False
    if constraint.kind == "choice":
        return text in constraint.choice
    if constraint.kind == "json_schema":
        import jsonschema

        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            return False
        schema = constraint.json_schema
        validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        return validator(schema).is_valid(record)
    return True  # regex, grammar: the matcher's Earley parse is the check (Rust regex syntax is not Python's)
