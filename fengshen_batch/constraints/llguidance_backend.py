"""Constraints through llguidance (MIT; a Rust core: Earley parser over a lexer, masks in microseconds).

Chosen over xgrammar after measuring both on a 50k byte-level BPE vocabulary: no invalid output for any kind,
where xgrammar let raw control characters into length-limited JSON strings. Three pitfalls of GPT2
checkpoints handled here:
- a GPT2 tokenizer built from vocab.json/merges.txt does not mark `<|endoftext|>` special, and llguidance
  then treats it as 13 bytes of text that a JSON string may contain: the copy given to llguidance has the
  EOS token marked special (the model's tokenizer is left as it is);
- llguidance needs the ByteLevel decoder to map tokens to bytes, which such a tokenizer may lack;
- the bitmask covers the model's padded vocabulary (50,304 rows for GPT2-3.5B, not the tokenizer's 50,257).
"""

from __future__ import annotations

import json
import os
import re

import llguidance
import llguidance.hf
from llguidance.gbnf_to_lark import any_to_lark

from .spec import JSON_SEPARATORS, Constraint

# the JSON compiler's options, pinned (see spec.py): compact layout, no free whitespace
JSON_OPTIONS = {
    "item_separator": JSON_SEPARATORS[0],
    "key_separator": JSON_SEPARATORS[1],
    "whitespace_flexible": False,
}


def grammar_of(constraint: Constraint) -> str:
    """llguidance's grammar text for a constraint (not yet checked)."""
    kind = constraint.kind
    if kind == "choice":
        lark = "start: " + " | ".join(json.dumps(c) for c in constraint.choice)  # Lark takes JSON strings
        return llguidance.LLMatcher.grammar_from_lark(lark)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(constraint.regex)
    if kind == "json_schema":
        return llguidance.LLMatcher.grammar_from_json_schema(
            constraint.generation_schema(), overrides=JSON_OPTIONS
        )
    text = constraint.grammar
    if "::=" in text:  # GBNF (llama.cpp) rather than Lark
        try:
            text = any_to_lark(text)
        except Exception as e:  # noqa: BLE001 - the converter raises whatever its parser meets
            raise ValueError(f"grammar: not valid GBNF: {e}") from None
    return llguidance.LLMatcher.grammar_from_lark(text)


class _Matcher:
    __slots__ = ("m",)

    def __init__(self, m: llguidance.LLMatcher):
        self.m = m

    def consume(self, token: int) -> bool:
        return self.m.consume_token(token)

    def accepting(self) -> bool:
        return self.m.is_accepting() and not self.m.is_error()

    def stopped(self) -> bool:
        return self.m.is_stopped()

    def error(self) -> str:
        return self.m.get_error()

    def fork(self) -> _Matcher:
        return _Matcher(self.m.deep_copy())


class LLGuidanceBackend:
    name = "llguidance"

    def __init__(self, tokenizer, vocab_size: int, eos_id: int):
        self.tokenizer = llguidance.LLTokenizer(
            _tokenizer_json(tokenizer, eos_id), n_vocab=vocab_size, eos_token=eos_id
        )
        # masks are filled on the engine's side thread while the model runs: a few Rust threads suffice
        self.executor = llguidance.LLExecutor(num_threads=max(1, min(8, (os.cpu_count() or 2) // 2)))
        self._grammars: dict[str, str] = {}  # a constraint's JSON -> its checked grammar (rows repeat them)

    @staticmethod
    def check(constraint: Constraint, tokenizer=None) -> str:
        """The checked grammar text; ValueError naming the constraint and the compiler's message."""
        grammar = grammar_of(constraint)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if is_error:
            raise ValueError(f"{constraint.kind} does not compile: {one_line(messages[0])}")
        return grammar

    def matcher(self, constraint: Constraint) -> _Matcher:
        key = constraint.model_dump_json()
        grammar = self._grammars.get(key)
        if grammar is None:
            grammar = self._grammars[key] = self.check(constraint, self.tokenizer)
        m = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if m.is_error():
            raise ValueError(f"{constraint.kind} does not compile: {one_line(m.get_error())}")
        return _Matcher(m)

    def fill(self, matchers, rows, bitmask) -> None:
        width = bitmask.shape[1] * bitmask.element_size()
        self.executor.unsafe_compute_mask_ptr(
            [(m.m, r) for m, r in zip(matchers, rows, strict=True)],
            bitmask.data_ptr(),
            width,
            bitmask.shape[0],
        )


def one_line(message: str) -> str:
    """A compiler's message on one line: its caret markers and echoed source lines dropped."""
    keep = [ln.strip() for ln in message.splitlines()]
    keep = [ln for ln in keep if ln and set(ln) != {"^"} and not re.match(r"^\d+ \|", ln)]
    return " ".join(keep)


def _tokenizer_json(tokenizer, eos_id: int) -> str:
    """The HF fast tokenizer as tokenizers' JSON, with EOS an added special token and a ByteLevel decoder."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "tk", None)  # HF's, or ours
    if backend is None or not hasattr(backend, "to_str"):
        raise ValueError(
            "constrained generation needs a tokenizer of the `tokenizers` library (a fast tokenizer)"
        )
    spec = json.loads(backend.to_str())
    spec["padding"] = spec["truncation"] = None
    eos = backend.id_to_token(eos_id)
    added = [t for t in spec.get("added_tokens") or [] if t["id"] != eos_id]
    added.append({"id": eos_id, "content": eos, "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": True})  # fmt: skip
    spec["added_tokens"] = sorted(added, key=lambda t: t["id"])
    if not spec.get("decoder"):
        spec["decoder"] = {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": True,
            "use_regex": True,
        }
    return json.dumps(spec)
