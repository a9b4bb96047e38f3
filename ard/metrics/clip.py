"""CLIP score of generated images against their prompts (Hessel et al. 2021: 100 x the cosine of CLIP's image and
text embeddings, floored at 0), through torchmetrics' `CLIPScore`, from a local CLIP directory (a transformers
`CLIPModel` and its `CLIPProcessor`; nothing is downloaded).

torchmetrics 1.9 reads `get_image_features` / `get_text_features` as tensors; transformers 5 returns output objects
whose `pooler_output` holds the projected embeddings, which `_Projected` hands over.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn


class _Projected(nn.Module):
    """A CLIPModel whose feature methods return the projected embeddings as tensors, whatever transformers' version."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @staticmethod
    def _tensor(out) -> torch.Tensor:
        return out if torch.is_tensor(out) else out.pooler_output

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)


def clip_score_metric(path: str | Path):
    """A torchmetrics CLIPScore over the CLIP at `path`; update(images uint8 (N, 3, H, W), texts), compute()."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"clip={path}: not a directory (a local CLIP: CLIPModel and CLIPProcessor files)")
    try:
        from torchmetrics.multimodal import CLIPScore
        from transformers import CLIPModel, CLIPProcessor
    except ImportError:
        raise ImportError("the CLIP score needs transformers: pip install -e \".[text]\"") from None
    return CLIPScore(model_name_or_path=lambda: (_Projected(CLIPModel.from_pretrained(path)).eval(),
                                                 CLIPProcessor.from_pretrained(path)))
