"""One document, two renderings: ``report.md`` (figures linked) and a self-contained ``report.html``.

The report is built once as a list of blocks; the renderers only format them, so the Markdown and the
HTML always say the same thing. HTML figures are embedded as base64 PNGs: the file can be mailed, opened
offline or shown as an MLflow artifact without its ``figures/`` folder.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

__all__ = [
    "Block",
    "Bullets",
    "Code",
    "FigureBlock",
    "Heading",
    "Paragraph",
    "Table",
    "to_html",
    "to_markdown",
]


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    frame: pd.DataFrame
    caption: str = ""


@dataclass(frozen=True)
class FigureBlock:
    path: Path
    caption: str


@dataclass(frozen=True)
class Code:
    text: str
    language: str = ""


Block = Heading | Paragraph | Bullets | Table | FigureBlock | Code


def _md_cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _md_table(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(_md_cell(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def to_markdown(title: str, blocks: list[Block], root: Path) -> str:
    """Figures are linked relative to ``root`` (the report directory)."""
    out = [f"# {title}", ""]
    for block in blocks:
        match block:
            case Heading(text, level):
                out += ["#" * level + " " + text, ""]
            case Paragraph(text):
                out += [text, ""]
            case Bullets(items):
                out += [*(f"- {item}" for item in items), ""]
            case Table(frame, caption):
                out += ([f"*{caption}*", ""] if caption else []) + [_md_table(frame), ""]
            case FigureBlock(path, caption):
                out += [f"![{caption}]({path.relative_to(root).as_posix()})", "", f"*{caption}*", ""]
            case Code(text, language):
                out += [f"```{language}", text, "```", ""]
    return "\n".join(out)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
.table{overflow-x:auto;margin:.5em 0 1.5em}
table{border-collapse:collapse;font-size:.88em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}td{white-space:nowrap}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
caption{caption-side:top;text-align:left;font-style:italic;padding-bottom:.3em}
figure{margin:1em 0 2em}img{max-width:100%}figcaption{font-style:italic;font-size:.9em}
pre{background:#f6f6f6;padding:.8em;overflow-x:auto}
"""


def _header(name: object) -> str:
    # A metric name breaks after its dots and underscores ("mbpp.pass_<wbr>at_1") instead of widening its
    # column: the results table of six benchmarks then fits a laptop's window.
    return re.sub(r"([._])", r"\1<wbr>", html.escape(str(name)))


def _html_table(frame: pd.DataFrame, caption: str) -> str:
    head = "".join(f"<th>{_header(c)}</th>" for c in frame.columns)
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
        for row in frame.itertuples(index=False)
    )
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    # A table still wider than the text column scrolls inside its own box, never the page.
    return f'<div class="table"><table>{cap}<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>'


def to_html(title: str, blocks: list[Block]) -> str:
    """A complete HTML page with every figure inlined as a ``data:image/png;base64`` URI."""
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for block in blocks:
        match block:
            case Heading(text, level):
                out.append(f"<h{level}>{html.escape(text)}</h{level}>")
            case Paragraph(text):
                out.append(f"<p>{html.escape(text)}</p>")
            case Bullets(items):
                out.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>")
            case Table(frame, caption):
                out.append(_html_table(frame, caption))
            case FigureBlock(path, caption):
                data = base64.b64encode(path.read_bytes()).decode("ascii")
                out.append(
                    f'<figure data-file="{html.escape(path.name)}"><img alt="{html.escape(caption)}" '
                    f'src="data:image/png;base64,{data}"><figcaption>{html.escape(caption)}</figcaption></figure>'
                )
            case Code(text, _):
                out.append(f"<pre><code>{html.escape(text)}</code></pre>")
    out.append("</body></html>")
    return "\n".join(out)
