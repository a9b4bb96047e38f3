"""A tiny random SD3 pipeline snapshot made on the spot (no download), laid out as stabilityai's diffusers snapshots
are: transformer/ (a tiny SD3, ard.backbones.sd3's "tiny" size with the asked blocks, latent channels and side:
32-wide text tokens, 24-wide pooled embeddings), text_encoder/ and text_encoder_2/ (CLIPTextModelWithProjection, 8
and 16 wide with 8- and 16-wide projections: pooled 8 + 16 = 24), text_encoder_3/ (a 32-wide T5 encoder),
tokenizer/, tokenizer_2/, tokenizer_3/ (word-level tokenizers of the given texts) and, with `vae`, a tiny VAE of as
many latent channels (vae/)."""
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from ard.backbones.sd3 import SD3
from test_imagenet_presets import tiny_vae
from test_text_store import make_tiny_t5
from tiny_clip import clip_tokenizer

CLIPS = {"": (8, 8), "_2": (16, 16)}  # CLIP-L's and CLIP-G's folder suffix: (width, projection width)


def make_tiny_sd3(directory, texts: list[str], channels: int = 1, side: int = 8, clip_tokens: int = 8,
                  vae: bool = False, num_layers: int = 2) -> Path:
    """The snapshot at `directory`: its transformer has `num_layers` blocks, its CLIPs read `clip_tokens` tokens
    (SD3's: 77). The transformer's weights are perturbed, so that its output depends on every input."""
    directory = Path(directory)
    torch.manual_seed(0)
    model = SD3().build("tiny", in_channels=channels, out_channels=channels, sample_size=side, num_layers=num_layers,
                        pos_embed_max_size=max(8, side // 2))  # a position grid that covers the side's tokens
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(directory / "transformer", safe_serialization=True)
    for suffix, (width, projection) in CLIPS.items():
        tokenizer = clip_tokenizer(texts, clip_tokens)
        tokenizer.save_pretrained(directory / f"tokenizer{suffix}")
        config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                                num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=clip_tokens,
                                projection_dim=projection, bos_token_id=1, eos_token_id=2, pad_token_id=2)
        CLIPTextModelWithProjection(config).save_pretrained(directory / f"text_encoder{suffix}")
    make_tiny_t5(directory / "text_encoder_3", texts, width=32, tokenizer_directory=directory / "tokenizer_3")
    if vae:
        tiny_vae(directory / "vae", latent_channels=channels)
    return directory
