"""The condition of text-to-image families: encoded prompts, one row per sample.

A `TextCondition` goes wherever a class-conditional DiT takes its labels (R,): through the student's step layout
(`repeat_interleave`), CFG's [cond; uncond] batch (`cat`, `null`) and the solvers, unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TextCondition:
    """Encoded prompts of R rows, and what the family needs besides (None where it needs nothing).

    The null condition of CFG is the encoding of the empty (or negative) prompt: `null` holds it as one row, so
    that `null_rows()` can stand beside any batch."""
    embeddings: torch.Tensor  # (R, T, C) the text encoder's tokens
    mask: torch.Tensor  # (R, T) bool: the valid tokens (all True for an encoder run without a mask)
    resolution: torch.Tensor | None = None  # (R, 2) image height and width in pixels (PixArt 1024 models)
    aspect_ratio: torch.Tensor | None = None  # (R, 1) height / width (PixArt 1024 models)
    pooled: torch.Tensor | None = None  # (R, P) pooled prompt embeddings (SD3: CLIP-L and CLIP-G's, P = 2048)
    null: TextCondition | None = None  # one row: the null prompt's embeddings, mask and pooled (its sizes unused)

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    def _rows(self, take) -> TextCondition:
        """Apply `take` to every per-row tensor (not to `null`, which is one row for every batch)."""
        return replace(self, **{f.name: take(getattr(self, f.name)) for f in fields(self)
                                if f.name != "null" and getattr(self, f.name) is not None})

    def __getitem__(self, rows) -> TextCondition:
        """The condition of some rows (an index tensor or a boolean mask)."""
        return self._rows(lambda x: x[rows])

    def repeat_interleave(self, repeats: int) -> TextCondition:
        return self._rows(lambda x: x.repeat_interleave(repeats, dim=0))  # (R * repeats, ...)

    def to(self, device: torch.device) -> TextCondition:
        moved = self._rows(lambda x: x.to(device))
        return replace(moved, null=None if self.null is None else self.null.to(device))

    def null_rows(self) -> TextCondition:
        """The null prompt for each of the R rows (its tokens, mask and pooled embedding), with the rows' own size
        conditions."""
        if self.null is None:
            raise ValueError("a text condition without its null prompt's encoding cannot be guided (CFG): encode "
                             "the null prompt with the prompts")
        if (self.pooled is None) != (self.null.pooled is None):
            raise ValueError("a text condition and its null prompt disagree on pooled embeddings (one of them has "
                             "none): encode both with the same encoder")
        rows = len(self)
        pooled = None if self.pooled is None else self.null.pooled.expand(rows, -1)  # (R, P)
        return replace(self, embeddings=self.null.embeddings.expand(rows, -1, -1),
                       mask=self.null.mask.expand(rows, -1), pooled=pooled, null=self.null)

    @staticmethod
    def cat(conditions: list[TextCondition]) -> TextCondition:
        """The rows of several conditions, in order, padded to the longest's token count (masked: families that
        read the mask ignore the padding; SD3, which reads none, refuses it); they must have the same fields."""
        tokens = max(c.embeddings.shape[1] for c in conditions)
        padded = [replace(c, embeddings=F.pad(c.embeddings, (0, 0, 0, tokens - c.embeddings.shape[1])),
                          mask=F.pad(c.mask, (0, tokens - c.mask.shape[1]))) for c in conditions]
        first = padded[0]
        joined = {f.name: torch.cat([getattr(c, f.name) for c in padded])
                  for f in fields(first) if f.name != "null" and getattr(first, f.name) is not None}
        return replace(first, **joined)
