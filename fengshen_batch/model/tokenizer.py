"""GPT2's byte-level BPE tokenizer through the `tokenizers` library directly.

It is the library transformers' fast GPT2 tokenizer wraps; reading the same files (`tokenizer.json`, else
`vocab.json` + `merges.txt`, and the special tokens of `tokenizer_config.json`), it gives the same ids and
text (`tests/test_loading.py` checks it against `AutoTokenizer`). Going direct spares every replica the
import of transformers, over a second of its start-up. Remote-code tokenizers (`trust_remote_code`) still go
through transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

EOS = "<|endoftext|>"
# transformers' `clean_up_tokenization`: the spaces its old tokenizers put before punctuation.
_CLEANUPS = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
             (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]  # fmt: skip


def _content(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


class GPT2TextTokenizer:
    """The part of transformers' tokenizer API the engine uses: encode, decode, ids <-> pieces, EOS."""

    def __init__(self, tokenizer, eos_token: str = EOS, clean_up_spaces: bool = False):
        self.tk = tokenizer
        self.eos_token = self.pad_token = eos_token
        self.eos_token_id = self.pad_token_id = tokenizer.token_to_id(eos_token)
        self.clean_up_spaces = clean_up_spaces

    @classmethod
    def from_dir(cls, path: Path) -> GPT2TextTokenizer:
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        specials_file = path / "special_tokens_map.json"
        specials = json.loads(specials_file.read_text()) if specials_file.exists() else {}
        eos = _content(config.get("eos_token")) or _content(specials.get("eos_token")) or EOS
        if (path / "tokenizer.json").exists():
            tk = Tokenizer.from_file(str(path / "tokenizer.json"))
        elif (path / "vocab.json").exists() and (path / "merges.txt").exists():
            tk = Tokenizer(models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt")))
            prefix = bool(config.get("add_prefix_space", False))
            tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix)
            tk.decoder = decoders.ByteLevel()
            tk.add_special_tokens([AddedToken(eos, special=True)])
        else:
            raise FileNotFoundError(f"no tokenizer.json, nor vocab.json + merges.txt, in {path}")
        if tk.token_to_id(eos) is None:
            raise ValueError(f"the tokenizer has no EOS token {eos!r}")
        return cls(tk, eos, bool(config.get("clean_up_tokenization_spaces", False)))

    def __len__(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    @property
    def added_tokens_decoder(self) -> dict:
        return self.tk.get_added_tokens_decoder()

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tk.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids) -> str:
        text = self.tk.decode(list(ids), skip_special_tokens=False)
        if self.clean_up_spaces:
            for a, b in _CLEANUPS:
                text = text.replace(a, b)
        return text

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str | None]:
        return [self.tk.id_to_token(i) for i in ids]

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self.tk.token_to_id(token)
