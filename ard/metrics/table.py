"""Every metrics table of the project in Markdown: one row per model, columns picked from COLUMNS by name
(or given as a Column of one's own: a registry entry with another format or spread key, dataclasses.replace).

    metrics_table(rows, ["model", "steps", "nfe", "fid", "fid_vs_teacher", "mse_vs_teacher"])
    metrics_table(rows, ["model", replace(COLUMNS["fid"], pm="fid_spread", bracket="fid_bootstrap_sd")])
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence


@dataclass(frozen=True)
class Column:
    """A table column: its header, the row key of its value and the value's format (str.format), with the row
    keys of a spread shown after ± and of a value shown in brackets, in the same format (left out where None)."""

    header: str
    key: str
    fmt: str = "{}"
    pm: str | None = None
    bracket: str | None = None

    def cell(self, row: Mapping) -> str:
        """The column's cell of `row`; "-" where the row has no value."""
        if row.get(self.key) is None:
            return "-"
        text = self.fmt.format(row[self.key])
        if self.pm is not None and row.get(self.pm) is not None:
            text += " ± " + self.fmt.format(row[self.pm])
        if self.bracket is not None and row.get(self.bracket) is not None:
            text += f" [{self.fmt.format(row[self.bracket])}]"
        return text


# The known columns, by the name of the evaluation report's key (ard.evaluate.REPORT_KEYS) they show.
COLUMNS = {column.key: column for column in (
    Column("model", "model"),
    Column("steps", "steps"),
    Column("seeds", "seeds"),
    Column("NFE", "nfe"),
    Column("FID vs real", "fid", "{:.2f}", pm="fid_sd"),
    Column("FID vs teacher", "fid_vs_teacher", "{:.2f}", pm="fid_vs_teacher_sd"),
    Column("same-noise MSE", "mse_vs_teacher", "{:.4f}", pm="mse_vs_teacher_se"),
    Column("IS", "is", "{:.2f}"),
    Column("precision", "precision", "{:.3f}"),
    Column("recall", "recall", "{:.3f}"),
    Column("s / image", "sec_per_image", "{:.2e}"),
    Column("GFLOPs / image", "gflops_per_image", "{:.4f}"),
    Column("prompt adherence", "prompt_adherence", "{:.3f}"),
    Column("VAE s / image", "decode_sec_per_image", "{:.2e}"),
    Column("CLIP score", "clip_score", "{:.2f}"),
)}


def metrics_table(rows: Iterable[Mapping], columns: Sequence[str | Column]) -> str:
    """A Markdown table (header, rule, one line per row; no trailing newline) of `columns` (COLUMNS names or
    Column) of `rows`."""
    columns = [COLUMNS[c] if isinstance(c, str) else c for c in columns]
    lines = ["| " + " | ".join(c.header for c in columns) + " |", "|---" * len(columns) + "|"]
    lines += ["| " + " | ".join(c.cell(row) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
