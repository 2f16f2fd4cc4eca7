"""What every report page shares: images embedded in the HTML itself (a report mailed, attached to a ticket or
opened as one object from a bucket shows its charts; the PNG files stay beside it for those who want them),
and the table of errors by kind."""

from __future__ import annotations

import base64
import html
import io

# What every page's stylesheet starts with; each adds its own widths
STYLE = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:%s;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em} td,th{border-bottom:1px solid #ddd;padding:3px 10px;
text-align:left;vertical-align:top}"""


def head(title: str, width: str, css: str) -> str:
    """A page's opening up to <body>: the shared style at `width`, plus the page's own `css`."""
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>\n'
            f"<style>\n{STYLE % width} {css}\n</style></head><body>")  # fmt: skip


def figure(height: float = 3.4):
    """(pyplot, a 7-inch figure, its axes without the top and right spines), on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, height), dpi=110)
    ax.spines[["top", "right"]].set_visible(False)
    return plt, fig, ax


def png_bytes(plt, fig) -> bytes:
    """The figure as PNG bytes, laid out tight; the figure is closed."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


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
