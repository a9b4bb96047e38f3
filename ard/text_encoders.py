"""Text encoders: prompts -> token embeddings (B, T, D) and their validity mask (B, T), once per prompt.

`TextEncoder` is what the encoding stage (ard/store/text.py) needs of an encoder: its identity (recorded in the
store's manifest, `conditioning.encoder`), its maximum token count (longer prompts are refused, never cut), whether
it is masked (its valid tokens' outputs do not depend on padding: only they are stored), and `encode`.

    HashEncoder   a deterministic stand-in without weights or downloads: each lower-cased word (and an end
                  token) is a fixed random vector drawn from the word's sha256, plus a fixed position vector.
                  Masked by construction. The caption-digits default and the tests use it.
    T5Encoder     a T5 encoder (PixArt's T5-XXL) through `transformers` (the `text` extra), from a local directory
                  holding the tokenizer and the model's safetensors; masked (PixArt reads its valid tokens), or,
                  `masked=False`, every token padded to max_tokens (SD3 runs its T5 without a mask).
"""
from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from typing import Literal

import torch

from ard.checks import check_choice

TextEncoderKind = Literal["hash", "t5"]  # the encoders available

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



class T5Encoder(TextEncoder):
    """A T5 encoder from a local directory (tokenizer + safetensors weights), through `transformers`."""

    def __init__(self, path: str, max_tokens: int = 120, masked: bool = True):
        try:
            from transformers import AutoTokenizer, T5EncoderModel
        except ImportError:
            raise ImportError("text_encoder='t5' needs transformers: pip install -e \".[text]\"") from None
        from ard.conditioning import encoder_identity

        self.name, self.path, self.max_tokens, self.masked = "t5", str(path), max_tokens, masked
        self._identity = encoder_identity(path)  # (refuses a directory without safetensors weights)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = T5EncoderModel.from_pretrained(path, use_safetensors=True).eval()
        self.dim = int(self.model.config.d_model)

    def identity(self) -> str:
        return self._identity

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text).input_ids)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        longest = max(self.count_tokens(t) for t in texts)
        if longest > self.max_tokens:
            raise ValueError(f"a prompt of {longest} tokens; the {self.name} encoder takes at most {self.max_tokens}")
        batch = self.tokenizer(texts, padding="longest" if self.masked else "max_length", max_length=self.max_tokens,
                               return_tensors="pt")
        mask = batch.attention_mask.bool() if self.masked else torch.ones_like(batch.attention_mask, dtype=torch.bool)
        out = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask if self.masked else None)
        return out.last_hidden_state.float(), mask  # (B, T, D), (B, T)


def load_text_encoder(kind: TextEncoderKind, dim: int, path: str | None = None, max_tokens: int = 120) -> TextEncoder:
    """The text encoder `kind` for a teacher that reads `dim`-wide text tokens: "hash" (no weights) or "t5" (from
    the local directory `path`); prompts of more than `max_tokens` tokens are refused."""
    check_choice("text_encoder", kind, TextEncoderKind)
    if kind == "hash":
        return HashEncoder(dim=dim, max_tokens=max_tokens)
    if path is None:
        raise ValueError("text_encoder='t5' needs text_encoder_path: a local directory with the tokenizer and the "
                         "encoder's safetensors")
    encoder = T5Encoder(path, max_tokens)
    if encoder.dim != dim:
        raise ValueError(f"text_encoder_path={path}: a {encoder.dim}-wide T5; the teacher reads {dim}-wide text "
                         "tokens (caption_channels)")
    return encoder
