"""Table rendering for reports: Markdown, HTML and LaTeX (booktabs) from a DataFrame, no extra dependency.

Numbers print with 4 significant digits; NaN and None print as an empty cell (HTML/Markdown) or "--" (LaTeX).
"""

from __future__ import annotations

import html
import math
from typing import Any


def fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.{digits - 1}e}"
        return f"{v:.{digits}g}"
    return str(v)


def md_table(df) -> str:
    if df.empty:
        return "_(none)_\n"
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(fmt(v).replace("|", "\\|") for v in r) + " |")
    return "\n".join(lines) + "\n"


def html_table(df, cls: str = "t") -> str:
    if df.empty:
        return "<p><em>(none)</em></p>"
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(v))}</td>" for v in r) + "</tr>" for _, r in df.iterrows())
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


_LATEX_ESC = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
              "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}"}


def latex_escape(s: str) -> str:
    return "".join(_LATEX_ESC.get(ch, ch) for ch in s)


def latex_table(df, caption: str, label: str, index_name: str | None = None) -> str:
    """A booktabs table of df (its index becomes the first column when index_name is given)."""
    data = df.reset_index() if index_name is not None else df
    cols = [latex_escape(str(c)) for c in data.columns]
    if index_name is not None:
        cols[0] = latex_escape(index_name)
    spec = "l" + "r" * (len(cols) - 1)
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{latex_escape(caption)}}}",
             rf"\label{{{label}}}", rf"\begin{{tabular}}{{{spec}}}", r"\toprule", " & ".join(cols) + r" \\",
             r"\midrule"]
    for _, r in data.iterrows():
        lines.append(" & ".join(latex_escape(fmt(v)) or "--" for v in r) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"
