"""One redaction for everything that leaves the process: manifests, reports, log lines, error messages, error
rows and what `submit` sends to a cluster.

What counts as a secret:
- in a URL: its userinfo (`https://user:token@host/...` -> `https://***@host/...`) and every query value
  (`?X-Amz-Signature=...&sig=...` -> `?X-Amz-Signature=***&sig=***`; presigned URLs and SAS tokens carry
  their credentials there, and no query value is needed to say which object was read);
- an environment variable's value (`runtime_env.env_vars`), unless its name is on `ENV_ALLOW` and does not
  look like a credential (`SECRET_NAME`: *_KEY, *_TOKEN, PASSWD, connection strings, ...);
- in free text (exception messages, log lines): every URL as above, `NAME=value` pairs whose name looks like a
  credential, and the literal values of this process's own credential-named environment variables
  (`AWS_SECRET_ACCESS_KEY`, `WANDB_API_KEY`, ...), wherever a library happened to print them.

Log records are redacted as they are made (`install_log_redaction`, once per process: the CLI and every
actor), so no handler, Ray's included, sees the secret. What is redacted is replaced by `***`, never dropped,
so a reader sees that something was there.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"

# Names of variables whose values are credentials: the cloud SDKs' (AWS_SECRET_ACCESS_KEY, AZURE_STORAGE_KEY,
# GOOGLE_APPLICATION_CREDENTIALS), tokens (HF_TOKEN, RAY_AUTH_TOKEN), API keys (WANDB_API_KEY), passwords,
# connection strings (AZURE_STORAGE_CONNECTION_STRING, DATABASE_URL's userinfo is handled as a URL). A name
# ending in TOKEN, not holding it: max_new_tokens=64 and token_budget=... are settings.
SECRET_NAME = re.compile(
    r"SECRET|TOKEN$|PASSWORD|PASSWD|PASSPHRASE|CREDENTIAL|API_?KEY|ACCESS_?KEY|(^|_)KEY$|(^|_)AUTH(ORIZATION)?($|_)|"
    r"SIGNATURE|CONNECTION_?STRING|PRIVATE|(^|_)SAS($|_)|COOKIE",
    re.IGNORECASE,
)
# Environment variables whose values are shown (they configure, they do not authenticate).
ENV_ALLOW = re.compile(
    r"^(FENGSHEN_[A-Z0-9_]+|OMP_NUM_THREADS|MKL_NUM_THREADS|TOKENIZERS_PARALLELISM|CUDA_VISIBLE_DEVICES|"
    r"HF_HOME|HF_HUB_OFFLINE|HF_ENDPOINT|TRANSFORMERS_OFFLINE|PYTHONPATH|PYTHONHASHSEED|TZ|LANG|LC_ALL|"
    r"AWS_REGION|AWS_DEFAULT_REGION|AWS_ENDPOINT_URL|AWS_PROFILE|RAY_DATA_[A-Z0-9_]+|NCCL_[A-Z0-9_]+)$"
)
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>`]+")
_PAIR = re.compile(r"\b([A-Za-z_][A-Za-z0-9_.-]*)(\s*[=:]\s*)(\"[^\"]*\"|'[^']*'|[^\s,;&'\"]+)")
_MIN_SECRET_LEN = 8  # shorter environment values are not searched for in text (they would match by chance)


def redact_url(url: str) -> str:
    """A URL without its userinfo and query values; anything that is not a URL unchanged."""
    if "://" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:  # not parseable as a URL: mask all of it past the scheme
        return url.split("://", 1)[0] + "://" + MASK
    netloc = parts.netloc
    if "@" in netloc:
        netloc = MASK + "@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        query = urlencode([(k, MASK) for k, _ in parse_qsl(query, keep_blank_values=True)], safe="*")
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def redact_env(env: dict[str, Any]) -> dict[str, Any]:
    """Environment variables with every value masked unless its name is on the allow-list (and not
    credential-like); allowed values still have their URLs redacted."""
    out = {}
    for name, value in env.items():
        shown = ENV_ALLOW.match(str(name)) and not SECRET_NAME.search(str(name))
        out[name] = redact_text(str(value)) if shown else MASK
    return out


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    """Values of credential-named variables of this process, longest first (searched for in text)."""
    env = os.environ if environ is None else environ
    values = {v for k, v in env.items() if SECRET_NAME.search(k) and len(v) >= _MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


def redact_text(text: str, extra_secrets: list[str] | tuple[str, ...] = ()) -> str:
    """Free text (a message, a log line) with URLs redacted, credential-named `NAME=value` pairs masked and
    this process's credential values replaced."""
    if not text:
        return text
    for value in (*extra_secrets, *secret_values()):
        if value and value in text:
            text = text.replace(value, MASK)
    text = _URL.sub(lambda m: redact_url(m.group(0)), text)

    def pair(m: re.Match) -> str:
        return m.group(1) + m.group(2) + MASK if SECRET_NAME.search(m.group(1)) else m.group(0)

    return _PAIR.sub(pair, text)


def redact_record(value: Any, key: str = "") -> Any:
    """A JSON-like record (a spec, a manifest) with every string redacted as text, and the values of any
    `env_vars` / `env` mapping masked unless allowed (`redact_env`). Values of credential-named keys are
    masked whole."""
    if isinstance(value, dict):
        if key in ("env_vars", "env"):
            return redact_env(value)
        return {k: redact_record(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_record(v, key) for v in value]
    if isinstance(value, str):
        if key and SECRET_NAME.search(key) and value:
            return MASK
        return redact_text(value)
    return value


def has_secret(url: str) -> bool:
    """A URL carries a credential (userinfo or query values): refused where a spec leaves this machine."""
    return "://" in url and redact_url(url) != url


class _RedactingFactory:
    """A log record factory that redacts each record's message as it is made."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, *args, **kwargs):
        record = self.inner(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string: leave it to logging to report
            return record
        clean = redact_text(message)
        if clean != message or record.args:
            record.msg, record.args = clean, ()
        return record


def install_log_redaction() -> None:
    """Redact every log record of this process from now on (idempotent)."""
    factory = logging.getLogRecordFactory()
    if not isinstance(factory, _RedactingFactory):
        logging.setLogRecordFactory(_RedactingFactory(factory))
