"""A tiny document model rendered to GitHub Markdown and to one self-contained HTML page."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Para:
    text: str
    muted: bool = False


@dataclass(frozen=True)
class Bullets:
    items: list[str]


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]
    reference: list[bool] = field(default_factory=list)  # rows drawn as reference (greyed, italic)
    caption: str = ""


@dataclass(frozen=True)
class Image:
    path: str  # relative to the output folder
    alt: str


Block = Heading | Para | Bullets | Table | Image


def to_markdown(blocks: list[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append("#" * b.level + " " + b.text)
        elif isinstance(b, Para):
            out.append(f"*{b.text}*" if b.muted else b.text)
        elif isinstance(b, Bullets):
            out.append("\n".join(f"- {item}" for item in b.items))
        elif isinstance(b, Table):
            lines = ["| " + " | ".join(_md_cell(h) for h in b.header) + " |", "|" + "---|" * len(b.header)]
            for i, row in enumerate(b.rows):
                cells = [_md_cell(c) for c in row]
                if i < len(b.reference) and b.reference[i]:
                    cells = [f"*{c}*" if c else c for c in cells]
                lines.append("| " + " | ".join(cells) + " |")
            if b.caption:
                lines.append("\n" + b.caption)
            out.append("\n".join(lines))
        elif isinstance(b, Image):
            out.append(f"![{b.alt}]({b.path})")
    return "\n\n".join(out) + "\n"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:2em auto;max-width:1400px;padding:0 1em;color:#1f2328;line-height:1.45}
h1{border-bottom:2px solid #d0d7de;padding-bottom:.3em}
h2{border-bottom:1px solid #d0d7de;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.8em}
th,td{border:1px solid #d0d7de;padding:3px 6px;text-align:right}
th{white-space:nowrap}
.scroll{overflow-x:auto}
th{background:#f6f8fa;text-align:left}
td{text-align:left}
td.num{text-align:right;white-space:nowrap}
td:first-child{white-space:nowrap}
tr.reference td{color:#6e7781;font-style:italic;background:#fafbfc}
p.muted{color:#57606a;font-size:.9em}
.caption{color:#57606a;font-size:.85em;margin-top:-.4em}
img{max-width:100%;border:1px solid #eaeef2;margin:.5em 0}
"""


_NUMBER = re.compile(r"^[+\-<\[]?\d|^–$")


def _td(text: str) -> str:
    cls = ' class="num"' if _NUMBER.match(text) else ""
    return f"<td{cls}>{html.escape(text)}</td>"


def to_html(blocks: list[Block], root: Path, title: str) -> str:
    """One HTML file: inline CSS, figures embedded as base64 PNG (no network, no other file)."""
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{html.escape(title)}</title><style>{CSS.strip()}</style></head><body>"]
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            cls = ' class="muted"' if b.muted else ""
            out.append(f"<p{cls}>{html.escape(b.text)}</p>")
        elif isinstance(b, Bullets):
            out.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            rows = ["<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in b.header) + "</tr>"]
            for i, row in enumerate(b.rows):
                cls = ' class="reference"' if i < len(b.reference) and b.reference[i] else ""
                rows.append(f"<tr{cls}>" + "".join(_td(c) for c in row) + "</tr>")
            out.append('<div class="scroll"><table>' + "".join(rows) + "</table></div>")
            if b.caption:
                out.append(f'<p class="caption">{html.escape(b.caption)}</p>')
        elif isinstance(b, Image):
            data = base64.b64encode((root / b.path).read_bytes()).decode("ascii")
            out.append(f'<img src="data:image/png;base64,{data}" alt="{html.escape(b.alt)}">')
    out.append("</body></html>")
    return "\n".join(out) + "\n"
