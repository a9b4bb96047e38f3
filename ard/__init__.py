"""ard: trajectory-conditioned autoregressive distillation (ARD) of diffusion transformers."""

__version__ = "0.1.0"
