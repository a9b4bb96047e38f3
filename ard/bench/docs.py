"""Refreshing the docs from the committed reports, the one writer of the docs (a benchmark run writes only its
report): in a Markdown file, every section between `<!-- NAME:start -->` and `<!-- NAME:end -->` gets the report
<results>/<stem of NAME>.md, and the section `results-summary` a table of every committed report's headline
(ard.bench.overview.summary_table)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ard.atomic import write_text_atomic
from ard.bench import ROOT
from ard.bench.overview import summary_table
from ard.bench.reports import report_path

SUMMARY = "results-summary"
SECTION = re.compile(r"<!-- ([\w.-]+):start -->\n?(.*?)<!-- \1:end -->", re.S)  # (name, body)


def section_text(name: str, doc: Path, results: Path) -> str:
    """What the section `name` of `doc` holds: the committed report's Markdown, or the summary of every report
    (each <stem>.md in `results`, with its JSON where it has one), linked relative to `doc`."""
    if name == SUMMARY:
        reports = {path.stem: path for path in sorted(results.glob("*.md"))}
        links = {stem: os.path.relpath(path, doc.resolve().parent) for stem, path in reports.items()}
        return summary_table({stem: json.loads(path.with_suffix(".json").read_text())
                              if path.with_suffix(".json").exists() else {} for stem, path in reports.items()}, links)
    path = report_path(results, name, ".md")
    if not path.exists():
        raise SystemExit(f"{doc}: section {name} has no report {path}")
    return path.read_text()


def refresh(doc: str | Path, results: str | Path = "docs/results") -> list[str]:
    """Rewrite every section of `doc` (relative to the repository, or absolute) from the reports in `results`;
    returns the names of the sections whose text changed (the file is rewritten only if one did)."""
    doc, results = ROOT / doc, ROOT / results
    if not doc.exists():
        raise SystemExit(f"{doc}: no such file")
    text = doc.read_text()
    changed = []

    def fill(match: re.Match) -> str:
        name, body = match.group(1), section_text(match.group(1), doc, results)
        if body != match.group(2):
            changed.append(name)
        return f"<!-- {name}:start -->\n{body}<!-- {name}:end -->"

    new = SECTION.sub(fill, text)
    if changed:
        write_text_atomic(doc, new)
    return changed
