"""Latent codecs: pixels [B, 3, F, H, W] in [-1, 1] <-> normalised latents [B, C, F_lat, h, w].

The DiT works in the normalised space (z - latents_mean) / latents_std, as diffusers' Wan
pipelines do. A preset names its codec; the sampler and plans only see this interface.
"""

from __future__ import annotations

import threading

import torch
from diffusers import AutoencoderKLWan


class WanCodec:
    """Wan2.1's causal 3D VAE (8x spatial, 4x temporal, 16 channels), encoding the distribution's mode."""

    def __init__(self, vae: AutoencoderKLWan) -> None:
        config = vae.config
        self.vae = vae
        self.channels: int = config.z_dim
        self.spatial_factor: int = config.scale_factor_spatial
        self.temporal_factor: int = config.scale_factor_temporal
        self.latents_mean = torch.tensor(config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        # diffusers multiplies by 1/std; doing the same keeps our latents bit-identical to its pipelines.
        self.inverse_std = 1.0 / torch.tensor(config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        # The VAE keeps a per-call feature cache on the module: one call at a time per codec.
        self._lock = threading.Lock()

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, F_lat, h, w) for a video of `frames` x `height` x `width` pixels."""
        return (
            self.channels,
            (frames - 1) // self.temporal_factor + 1,
            height // self.spatial_factor,
            width // self.spatial_factor,
        )

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels `[B, 3, 1 + 4k, H, W]` -> normalised latents `[B, C, 1 + k, h, w]` (float32)."""
        parameter = next(self.vae.parameters())
        with self._lock:
            latents = self.vae.encode(pixels.to(parameter)).latent_dist.mode()
        mean, inverse_std = self.latents_mean.to(latents), self.inverse_std.to(latents)
        return ((latents - mean) * inverse_std).float()

    def encode_segment(self, pixels: torch.Tensor, trailing: bool) -> torch.Tensor:
        """Encode a conditioning segment.

        Leading segments and images are 1 + 4k frames and encode as a video (an image is a
        one-frame video). A trailing segment of 4k frames cannot start a causal encoding, so its
        first frame is repeated as a one-frame lead-in (1 + 4k frames) and the lead-in's latent
        is dropped: k latents, latent j covering the segment's frames 4j .. 4j + 3.
        """
        if not trailing:
            return self.encode(pixels)
        lead_in = torch.cat([pixels[:, :, :1], pixels], dim=2)
        return self.encode(lead_in)[:, :, 1:]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> pixels `[B, 3, F, H, W]` in [-1, 1] (float32)."""
        parameter = next(self.vae.parameters())
        mean, inverse_std = self.latents_mean.to(latents), self.inverse_std.to(latents)
        raw = latents / inverse_std + mean
        with self._lock:
            pixels = self.vae.decode(raw.to(parameter), return_dict=False)[0]
        return pixels.float()
