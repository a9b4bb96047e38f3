"""Text encoders: prompts -> token embeddings (B, T, D) and their validity mask (B, T), once per prompt.

`TextEncoder` is what the encoding stage (ard/store/text.py) needs of an encoder: its identity (recorded in the
store's manifest, `conditioning.encoder`), its maximum token count (longer prompts are refused, never cut), whether
it is masked (its valid tokens' outputs do not depend on padding: only they are stored), and `encode`.

    HashEncoder   a deterministic stand-in without weights or downloads: each lower-cased word (and an end
                  token) is a fixed random vector drawn from the word's sha256, plus a fixed position vector.
                  Masked by construction. The caption-digits default and the tests use it.
"""
from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from typing import Literal

import torch

from ard.checks import check_choice

TextEncoderKind = Literal["hash"]  # the encoders available (T5 through `transformers` is still to come)

END = "</s>"  # the end token every encoded prompt finishes with (so the empty prompt has one valid token)


class TextEncoder(ABC):
    name: str  # recorded in the manifest
    path: str | None  # where it was loaded from (informational)
    max_tokens: int  # prompts with more tokens are refused
    dim: int  # embedding width D
    masked: bool  # True: valid tokens only are stored; False: every token up to max_tokens

    @abstractmethod
    def identity(self) -> str:
        """sha256 of what decides its outputs (its weights), recorded in the manifest."""

    @abstractmethod
    def count_tokens(self, text: str) -> int:
        """Tokens of `text`, its end token included."""

    @abstractmethod
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings (B, T, D) float32 and the valid-token mask (B, T) bool; T: the longest prompt's count
        (masked encoders) or max_tokens."""


class HashEncoder(TextEncoder):
    """Deterministic word embeddings (see the module docstring): the same words always give the same vectors,
    whatever the batch or its padding."""

    def __init__(self, dim: int = 32, max_tokens: int = 16, seed: int = 0):
        self.name, self.path, self.max_tokens, self.dim, self.masked = "hash", None, max_tokens, dim, True
        self.seed = seed
        g = torch.Generator().manual_seed(seed)
        self.positions = 0.1 * torch.randn(max_tokens, dim, generator=g)  # (T_max, D)

    def identity(self) -> str:
        settings = dict(name=self.name, dim=self.dim, max_tokens=self.max_tokens, seed=self.seed)
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()

    def tokens(self, text: str) -> list[str]:
        return text.lower().split() + [END]

    def count_tokens(self, text: str) -> int:
        return len(self.tokens(text))

    def word(self, token: str) -> torch.Tensor:
        seed = int.from_bytes(hashlib.sha256(f"{self.seed}:{token}".encode()).digest()[:8], "little")
        return torch.randn(self.dim, generator=torch.Generator().manual_seed(seed))  # (D,)

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = [self.tokens(t) for t in texts]
        longest = max(len(t) for t in tokens)
        if longest > self.max_tokens:
            raise ValueError(f"a prompt of {longest} tokens; the {self.name} encoder takes at most {self.max_tokens}")
        out = torch.zeros(len(texts), longest, self.dim)  # (B, T, D)
        mask = torch.zeros(len(texts), longest, dtype=torch.bool)  # (B, T)
        for i, words in enumerate(tokens):
            out[i, :len(words)] = torch.stack([self.word(w) for w in words]) + self.positions[:len(words)]
            mask[i, :len(words)] = True
        return out, mask


def load_text_encoder(kind: TextEncoderKind, dim: int) -> TextEncoder:
    """The text encoder `kind` for a teacher that reads `dim`-wide text tokens."""
    check_choice("text_encoder", kind, TextEncoderKind)
    return HashEncoder(dim=dim, max_tokens=HASH_MAX_TOKENS)


HASH_MAX_TOKENS = 32  # the hash encoder's prompt length limit in precompute (short captions)
