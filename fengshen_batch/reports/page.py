"""What every report page shares: images embedded in the HTML itself (a report mailed, attached to a ticket or
opened as one object from a bucket shows its charts; the PNG files stay beside it for those who want them),
and the table of errors by kind."""

from __future__ import annotations

import base64
import html


def png_img(png: bytes, alt: str) -> str:
    """An <img> holding `png` as a data: URI."""
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def errors_table(error_kinds: dict[str, int], rows: int) -> str:
    """Rows in errors/ by error_kind, most first, with their share of the input ('' when there are none)."""
    if not error_kinds:
        return ""
    body = "".join(
        f"<tr><td><code>{html.escape(kind)}</code></td><td>{n:,}</td><td>{n / max(1, rows):.2%}</td></tr>"
        for kind, n in sorted(error_kinds.items(), key=lambda kv: (-kv[1], kv[0]))
    )
    return (
        "<h2>Errors by kind</h2><p>Each such row is in <code>errors/</code> with its <code>error_message</code>."
        f"</p><table><tr><th>error_kind</th><th>rows</th><th>of the input</th></tr>{body}</table>"
    )
