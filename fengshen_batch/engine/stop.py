"""Incremental stop-string detection on the bytes of each new token.

GPT2's byte-level BPE maps every token id to a fixed byte string, so the output text is the UTF-8 decoding of
the concatenated token bytes. A stop string first appears in the output when its UTF-8 bytes appear in
(the previous `longest - 1` bytes + the new token's bytes); UTF-8 is self-synchronising, so a byte match is a
text match. Per token that is one `bytes.find` per stop string, whatever the output length. The final text
and token count are cut by `generation.finish_sample`, from the tokenizer's own decoding, as before.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

from .sequence import Sequence


def _byte_decoder() -> dict[str, int]:
    """GPT2's byte-level alphabet inverted: the printable stand-in of each byte -> the byte. Printable
    Latin-1 bytes stand for themselves; the other 68 bytes take the code points from 256 on, in order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in set(printable)]
    table.update({chr(256 + n): b for n, b in enumerate(others)})
    return table


def token_bytes(tokenizer, vocab_size: int) -> list[bytes]:
    """The bytes each token id stands for (added tokens: their text; ids past the tokenizer: nothing)."""
    decoder = _byte_decoder()
    added = {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    pieces = tokenizer.convert_ids_to_tokens(list(range(min(vocab_size, len(tokenizer)))))
    table = []
    for i, piece in enumerate(pieces):
        if i in added:
            table.append(added[i].encode())
        elif piece is None:
            table.append(b"")
        else:
            try:
                table.append(bytes(decoder[c] for c in piece))
            except KeyError:  # not a byte-level piece: fall back to the tokenizer's own decoding
                table.append(tokenizer.decode([i]).encode())
    return table + [b""] * (vocab_size - len(table))


class StopChecker:
    def __init__(self, tokenizer, stop: Seq[str], vocab_size: int):
        self.stop = [s.encode() for s in stop]
        self.keep = max(map(len, self.stop)) - 1  # bytes of context a new match can start in
        self.table = token_bytes(tokenizer, vocab_size)

    def update(self, seq: Sequence, token: int) -> bool:
        """Add `token` to `seq`'s tail; True if a stop string now appears in its output."""
        window = seq.tail + self.table[token]
        seq.tail = window[-self.keep :] if self.keep else b""
        return any(s in window for s in self.stop)
