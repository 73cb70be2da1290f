"""The pieces every HTML report of the project is made of (the evaluation, validation, audit and explain reports):
one stylesheet, summary cards, embedded PNG figures, escaping, and the plots' colours and resolution."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

__all__ = ["COLOURS", "CSS", "DPI", "card", "esc", "img_tag", "save_figure"]

DPI = 110
COLOURS = {"non": "#1f77b4", "covid": "#d62728", "op": "#111111", "chance": "#999999"}


def esc(x: Any) -> str:
    """``x`` as HTML text (quotes escaped too: safe in attributes)."""
    return html.escape(str(x), quote=True)


def save_figure(fig: Figure, path: Path) -> None:
    """``fig`` as a PNG at the reports' resolution."""
    fig.savefig(path, format="png", dpi=DPI)


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,Helvetica,Arial,sans-serif;
margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.sub{color:#666;margin-top:0}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{border:1px solid #ddd;border-radius:8px;padding:10px 14px;min-width:180px;background:#fafafa}
.card .label{font-size:.85em;color:#555}.card .value{font-size:1.6em;font-weight:600}
.card .ci{font-size:.85em;color:#444}
table{border-collapse:collapse;margin:.5em 0}
th,td{border:1px solid #ddd;padding:4px 10px;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f0f0f0}
.figs{display:flex;flex-wrap:wrap;gap:16px}.figs figure{margin:0}
.figs img{max-width:100%;border:1px solid #eee}
.note{color:#8a5a00;font-size:.9em}
footer{margin-top:2em;color:#777;font-size:.85em}
"""


def card(label: str, value: str, detail: str = "") -> str:
    """A summary card: a label, a large value, a line of detail."""
    return (
        f'<div class="card"><div class="label">{esc(label)}</div>'
        f'<div class="value">{esc(value)}</div><div class="ci">{esc(detail)}</div></div>'
    )


def img_tag(path: Path, alt: str) -> str:
    """The PNG at ``path`` embedded in the page (base64), with ``alt`` as its caption."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{esc(alt)}"><figcaption>{esc(alt)}</figcaption></figure>'
    )
