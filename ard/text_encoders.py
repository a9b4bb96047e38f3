"""Text encoders: prompts -> token embeddings (B, T, D), their validity mask (B, T) and, for families that read one,
a pooled embedding per prompt (B, P), once per prompt.

`TextEncoder` is what the encoding stage (ard/store/text.py) needs of an encoder: its identity (recorded in the
store's manifest, `conditioning.encoder`), its maximum token count (longer prompts are refused, never cut), whether
it is masked (its valid tokens' outputs do not depend on padding: only they are stored), the width of its pooled
embeddings (None: it makes none), and `encode` (an `Encoded`).

    HashEncoder   a deterministic stand-in without weights or downloads: each lower-cased word (and an end
                  token) is a fixed random vector drawn from the word's sha256, plus a fixed position vector.
                  Masked by construction. The caption-digits default and the tests use it.
    T5Encoder     a T5 encoder (PixArt's T5-XXL) through `transformers` (the `text` extra), from a local directory
                  holding the tokenizer and the model's safetensors; masked (PixArt reads its valid tokens), or,
                  `masked=False`, every token padded to max_tokens (SD3 runs its T5 without a mask).
    SD3Encoder    Stable Diffusion 3's three encoders as diffusers' StableDiffusion3Pipeline.encode_prompt runs them:
                  CLIP-L's and CLIP-G's penultimate hidden states (77 tokens each, concatenated on the channel axis
                  and zero-padded to T5's width), then T5's tokens (run without a mask, padded to max_tokens): 77 +
                  256 = 333 tokens of 4096 for SD3-medium, all stored; pooled = [CLIP-L's; CLIP-G's] projected
                  pooled embeddings (768 + 1280 = 2048). From an SD3 pipeline snapshot (text_encoder, text_encoder_2,
                  text_encoder_3, tokenizer, tokenizer_2, tokenizer_3) or three directories (CLIP-L, CLIP-G, T5, each
                  with its tokenizer). A prompt longer than the CLIPs' 77 tokens is read whole by T5 and cut to its
                  first 77 by the CLIPs, as the pipeline does (CLIP reads at most 77); one longer than T5's maximum
                  is refused.
"""
from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from ard.checks import check_choice

TextEncoderKind = Literal["hash", "t5", "sd3"]  # the encoders available

END = "</s>"  # the end token every encoded prompt finishes with (so the empty prompt has one valid token)


class Encoded(NamedTuple):
    """What an encoder makes of a batch of B prompts."""
    embeddings: torch.Tensor  # (B, T, D) float32 tokens
    mask: torch.Tensor  # (B, T) bool: the valid tokens
    pooled: torch.Tensor | None = None  # (B, P) float32 pooled embeddings (SD3's); None: the encoder makes none


class TextEncoder(ABC):
    name: str  # recorded in the manifest
    path: str | None  # where it was loaded from (informational)
    max_tokens: int  # prompts with more tokens are refused
    dim: int  # embedding width D
    masked: bool  # True: valid tokens only are stored; False: every token up to max_tokens
    pooled_dim: int | None = None  # width P of the pooled embeddings `encode` returns; None: it returns none

    @abstractmethod
    def identity(self) -> str:
        """sha256 of what decides its outputs (its weights), recorded in the manifest."""

    @abstractmethod
    def count_tokens(self, text: str) -> int:
        """Tokens of `text`, its end token included."""

    @abstractmethod
    def encode(self, texts: list[str]) -> Encoded:
        """Embeddings (B, T, D) float32, the valid-token mask (B, T) bool and the pooled embeddings (B, P) or None;
        T: the longest prompt's count (masked encoders) or max_tokens."""


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

    def encode(self, texts: list[str]) -> Encoded:
        tokens = [self.tokens(t) for t in texts]
        longest = max(len(t) for t in tokens)
        if longest > self.max_tokens:
            raise ValueError(f"a prompt of {longest} tokens; the {self.name} encoder takes at most {self.max_tokens}")
        out = torch.zeros(len(texts), longest, self.dim)  # (B, T, D)
        mask = torch.zeros(len(texts), longest, dtype=torch.bool)  # (B, T)
        for i, words in enumerate(tokens):
            out[i, :len(words)] = torch.stack([self.word(w) for w in words]) + self.positions[:len(words)]
            mask[i, :len(words)] = True
        return Encoded(out, mask)


class T5Encoder(TextEncoder):
    """A T5 encoder from a local directory (tokenizer + safetensors weights), through `transformers`; `tokenizer`:
    the tokenizer's own directory where it is not `path` (an SD3 snapshot's tokenizer_3 beside text_encoder_3)."""

    def __init__(self, path: str | Path, max_tokens: int = 120, masked: bool = True,
                 tokenizer: str | Path | None = None):
        try:
            from transformers import AutoTokenizer, T5EncoderModel
        except ImportError:
            raise ImportError("text_encoder='t5' needs transformers: pip install -e \".[text]\"") from None
        from ard.conditioning import encoder_identity

        self.name, self.path, self.max_tokens, self.masked = "t5", str(path), max_tokens, masked
        self._identity = encoder_identity(path)  # (refuses a directory without safetensors weights)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or path)
        self.model = T5EncoderModel.from_pretrained(path, use_safetensors=True).eval()
        self.dim = int(self.model.config.d_model)

    def identity(self) -> str:
        return self._identity

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text).input_ids)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> Encoded:
        longest = max(self.count_tokens(t) for t in texts)
        if longest > self.max_tokens:
            raise ValueError(f"a prompt of {longest} tokens; the {self.name} encoder takes at most {self.max_tokens}")
        batch = self.tokenizer(texts, padding="longest" if self.masked else "max_length", max_length=self.max_tokens,
                               return_tensors="pt")
        mask = batch.attention_mask.bool() if self.masked else torch.ones_like(batch.attention_mask, dtype=torch.bool)
        out = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask if self.masked else None)
        return Encoded(out.last_hidden_state.float(), mask)  # (B, T, D), (B, T)


# An SD3 pipeline snapshot's (model, tokenizer) folders of CLIP-L, CLIP-G and T5, in encode_prompt's order
SD3_PARTS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"), ("text_encoder_3", "tokenizer_3"))


def sd3_parts(path: str | list[str]) -> list[tuple[Path, Path]]:
    """The (model, tokenizer) directories of SD3's CLIP-L, CLIP-G and T5: an SD3 pipeline snapshot's subfolders
    (`path` one directory), or three directories, each holding its model and its tokenizer."""
    if isinstance(path, (list, tuple)):
        if len(path) != 3:
            raise ValueError(f"text_encoder_path={list(path)}: {len(path)} directories; text_encoder='sd3' takes an "
                             "SD3 pipeline snapshot or three directories: CLIP-L, CLIP-G, T5")
        return [(Path(p), Path(p)) for p in path]
    parts = [(Path(path) / model, Path(path) / tokenizer) for model, tokenizer in SD3_PARTS]
    missing = next((p for pair in parts for p in pair if not p.is_dir()), None)
    if missing is not None:
        raise FileNotFoundError(f"{missing}: not found; text_encoder='sd3' takes an SD3 pipeline snapshot (text_encoder"
                                ", text_encoder_2, text_encoder_3, tokenizer, tokenizer_2, tokenizer_3) or three "
                                "directories: CLIP-L, CLIP-G, T5")
    return parts


class SD3Encoder(TextEncoder):
    """SD3's CLIP-L, CLIP-G and T5 (see the module docstring) through `transformers`; `max_tokens` is T5's token
    count (the pipeline's max_sequence_length), and a prompt's tokens are the CLIPs' 77 and T5's."""

    def __init__(self, path: str | list[str], max_tokens: int = 256):
        try:
            from transformers import AutoTokenizer, CLIPTextModelWithProjection
        except ImportError:
            raise ImportError("text_encoder='sd3' needs transformers: pip install -e \".[text]\"") from None
        from ard.conditioning import encoder_identity

        (clip_l, tokenizer_l), (clip_g, tokenizer_g), (t5, tokenizer_t5) = sd3_parts(path)
        self.t5 = T5Encoder(t5, max_tokens, masked=False, tokenizer=tokenizer_t5)  # every token, no mask
        clips = [encoder_identity(clip_l), encoder_identity(clip_g)]  # (refuse directories without weights)
        self._identity = hashlib.sha256(" ".join([*clips, self.t5.identity()]).encode()).hexdigest()
        self.tokenizers = [AutoTokenizer.from_pretrained(t) for t in (tokenizer_l, tokenizer_g)]
        self.clips = [CLIPTextModelWithProjection.from_pretrained(m, use_safetensors=True).eval()
                      for m in (clip_l, clip_g)]
        self.clip_tokens = int(self.tokenizers[0].model_max_length)  # 77: the pipeline's tokenizer_max_length
        self.name, self.masked = "sd3", False
        self.path = ", ".join(map(str, path)) if isinstance(path, (list, tuple)) else str(path)
        self.max_tokens, self.dim = self.clip_tokens + max_tokens, self.t5.dim
        self.pooled_dim = sum(int(m.config.projection_dim) for m in self.clips)
        width = sum(int(m.config.hidden_size) for m in self.clips)
        if width > self.dim:
            raise ValueError(f"text_encoder_path={self.path}: CLIP-L and CLIP-G are {width} wide together; SD3 pads "
                             f"them to T5's width {self.dim}, which must not be narrower")

    def identity(self) -> str:
        """sha256 of the three encoders' weight digests (ard.conditioning.encoder_identity), in pipeline order."""
        return self._identity

    def count_tokens(self, text: str) -> int:
        return self.clip_tokens + self.t5.count_tokens(text)  # the CLIPs' fixed 77, then T5's (its end token too)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> Encoded:
        """encode_prompt's prompt_embeds (B, 77 + T5, D) and pooled_prompt_embeds (B, P), in float32."""
        hidden, pooled = [], []
        for tokenizer, clip in zip(self.tokenizers, self.clips):
            ids = tokenizer(texts, padding="max_length", max_length=self.clip_tokens, truncation=True,
                            return_tensors="pt").input_ids  # (B, 77)
            out = clip(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2].float())  # (B, 77, C_i) the penultimate layer's tokens
            pooled.append(out.text_embeds.float())  # (B, P_i) the projected pooled embedding
        clip_tokens = torch.cat(hidden, dim=-1)  # (B, 77, C_L + C_G)
        clip_tokens = F.pad(clip_tokens, (0, self.dim - clip_tokens.shape[-1]))  # (B, 77, D) zero-padded
        t5 = self.t5.encode(texts).embeddings  # (B, T5, D) (refuses prompts over T5's max_tokens)
        embeddings = torch.cat([clip_tokens, t5], dim=1)  # (B, 77 + T5, D)
        mask = torch.ones(embeddings.shape[:2], dtype=torch.bool)  # (B, 77 + T5) all read: SD3 takes no mask
        return Encoded(embeddings, mask, torch.cat(pooled, dim=-1))  # ..., (B, P_L + P_G)


def load_text_encoder(kind: TextEncoderKind, dim: int, path: str | list[str] | None = None, max_tokens: int = 120,
                      pooled_dim: int | None = None) -> TextEncoder:
    """The text encoder `kind` for a teacher that reads `dim`-wide text tokens and `pooled_dim`-wide pooled
    embeddings (None: none): "hash" (no weights), "t5" (from the local directory `path`) or "sd3" (from an SD3
    pipeline snapshot or three directories, `path`); prompts of more than `max_tokens` tokens (sd3: T5 tokens) are
    refused. One line when the encoder does not give what the teacher reads."""
    check_choice("text_encoder", kind, TextEncoderKind)
    if (kind == "sd3") != (pooled_dim is not None):
        raise ValueError(f"text_encoder={kind!r} " + (
            f"gives no pooled text embeddings; the teacher reads {pooled_dim}-wide ones (pooled_projection_dim): "
            "text_encoder='sd3'" if pooled_dim is not None else
            "gives pooled text embeddings for an SD3 teacher; this teacher reads none: text_encoder='t5' or 'hash'"))
    if kind == "hash":
        return HashEncoder(dim=dim, max_tokens=max_tokens)
    if path is None:
        raise ValueError(f"text_encoder={kind!r} needs text_encoder_path: " + (
            "a local directory with the tokenizer and the encoder's safetensors" if kind == "t5" else
            "an SD3 pipeline snapshot (text_encoder*, tokenizer*) or three directories: CLIP-L, CLIP-G, T5"))
    if kind == "t5" and isinstance(path, (list, tuple)):
        raise ValueError(f"text_encoder_path={list(path)}: text_encoder='t5' takes one directory")
    encoder = T5Encoder(path, max_tokens) if kind == "t5" else SD3Encoder(path, max_tokens)
    if encoder.dim != dim:
        raise ValueError(f"text_encoder_path={encoder.path}: {encoder.dim}-wide text tokens; the teacher reads "
                         f"{dim}-wide ones (caption_channels / joint_attention_dim)")
    if encoder.pooled_dim != pooled_dim:
        raise ValueError(f"text_encoder_path={encoder.path}: {encoder.pooled_dim}-wide pooled embeddings (CLIP-L + "
                         f"CLIP-G projections); the teacher reads {pooled_dim}-wide ones (pooled_projection_dim)")
    return encoder
