"""Captions of the digits: the text-to-image default's prompts. Each digit has the same few captions; the prompt
file configs/digits_t2i/captions.jsonl lists them in `digit_captions()` order (ids "<digit>-<k>"), so a prompt's
index tells its digit (`caption_digit`), which the digit classifier checks in the prompt-adherence metric.

    python -m ard.data.captions configs/digits_t2i/captions.jsonl   # (re)write the prompt file
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from ard.atomic import write_text_atomic
from ard.backbones.text import TextCondition
from ard.conditioning import Prompt
from ard.text_encoders import TextEncoder

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ["a handwritten {name}", "the digit {name}", "a {name} written by hand", "the number {numeral}"]


def digit_captions() -> list[Prompt]:
    """The captions of digit d are prompts d * len(TEMPLATES) ... (d + 1) * len(TEMPLATES) - 1."""
    return [Prompt(f"{d}-{k}", t.format(name=NAMES[d], numeral=d)) for d in range(len(NAMES))
            for k, t in enumerate(TEMPLATES)]


def caption_digit(index: int) -> int:
    """The digit that prompt `index` of `digit_captions()` names."""
    return index // len(TEMPLATES)


class CaptionConditions:
    """Every digit caption and the null prompt, encoded once by `encoder`: `conditions(digits, templates, drop)`
    is the TextCondition of caption `templates` (B,) of each digit (None: drawn at random), the null prompt in
    the rows where `drop` (CFG training), on the digits' device."""

    def __init__(self, encoder: TextEncoder):
        encoded = encoder.encode([p.text for p in digit_captions()] + [""])
        self.embeddings, self.mask = encoded.embeddings, encoded.mask  # (P+1, T, D), (P+1, T)
        self.null_row = len(NAMES) * len(TEMPLATES)

    def __call__(self, digits: torch.Tensor, templates: torch.Tensor | None = None,
                 drop: torch.Tensor | None = None) -> TextCondition:
        if templates is None:
            templates = torch.randint(len(TEMPLATES), digits.shape, device=digits.device)  # (B,)
        rows = digits * len(TEMPLATES) + templates  # (B,) prompt indices
        rows = rows if drop is None else torch.where(drop, torch.full_like(rows, self.null_row), rows)
        rows = rows.cpu()
        null = TextCondition(self.embeddings[self.null_row:], self.mask[self.null_row:])
        return TextCondition(self.embeddings[rows], self.mask[rows], null=null).to(digits.device)


def write_prompt_file(path: str | Path) -> Path:
    lines = "".join(json.dumps({"id": p.id, "text": p.text}) + "\n" for p in digit_captions())
    return write_text_atomic(path, lines)


if __name__ == "__main__":
    print(write_prompt_file(sys.argv[1]))
