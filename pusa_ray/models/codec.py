"""Latent codecs: pixels [B, 3, F, H, W] in [-1, 1] <-> normalised latents [B, C, F_lat, h, w].

The DiT works in the normalised space (z - latents_mean) / latents_std, as diffusers' Wan
pipelines do. A preset names its codec; the sampler and plans only see this interface.
"""

from __future__ import annotations

import threading
from typing import Any

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


SPACE_TO_DEPTH = "SpaceToDepthCodec"  # `_class_name` of its config (a preset's `vae`, vae/config.json)


class SpaceToDepthCodec:
    """A fixed, exactly invertible codec: each f x f pixel block becomes 3*f*f channels, per frame.

    No weights and no temporal compression (factor 1: any frame count). Channel `c*f*f + dy*f + dx`
    holds colour `c` of the block's pixel (dy, dx); latents are normalised per channel by the
    config's `latents_mean` / `latents_std`, like the Wan VAE's.
    """

    def __init__(self, config: dict) -> None:
        self.spatial_factor: int = int(config["scale_factor_spatial"])
        self.temporal_factor: int = 1
        self.channels: int = 3 * self.spatial_factor**2
        if int(config.get("z_dim", self.channels)) != self.channels:
            raise ValueError(f"z_dim must be 3 * scale_factor_spatial**2 = {self.channels}")
        self.config = {
            "_class_name": SPACE_TO_DEPTH,
            "scale_factor_spatial": self.spatial_factor,
            "scale_factor_temporal": 1,
            "z_dim": self.channels,
            "latents_mean": [float(v) for v in config["latents_mean"]],
            "latents_std": [float(v) for v in config["latents_std"]],
        }
        self.latents_mean = torch.tensor(self.config["latents_mean"]).view(1, -1, 1, 1, 1)
        self.inverse_std = 1.0 / torch.tensor(self.config["latents_std"]).view(1, -1, 1, 1, 1)
        if self.latents_mean.shape[1] != self.channels or self.inverse_std.shape[1] != self.channels:
            raise ValueError(f"latents_mean and latents_std need {self.channels} values each")

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        return (self.channels, frames, height // self.spatial_factor, width // self.spatial_factor)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels `[B, 3, F, H, W]` -> normalised latents `[B, 3*f*f, F, H/f, W/f]` (float32)."""
        batch, colours, frames, height, width = pixels.shape
        f = self.spatial_factor
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f}, got {height}x{width}")
        blocks = pixels.float().reshape(batch, colours, frames, height // f, f, width // f, f)
        latents = blocks.permute(0, 1, 4, 6, 2, 3, 5).reshape(batch, colours * f * f, frames, height // f, -1)
        return (latents - self.latents_mean.to(latents)) * self.inverse_std.to(latents)

    def encode_segment(self, pixels: torch.Tensor, trailing: bool) -> torch.Tensor:
        """Frames encode independently: leading and trailing segments alike, one latent per frame."""
        return self.encode(pixels)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> pixels `[B, 3, F, H, W]` (float32), the exact inverse of `encode`."""
        batch, _, frames, height, width = latents.shape
        f = self.spatial_factor
        raw = latents.float() / self.inverse_std.to(latents.device) + self.latents_mean.to(latents.device)
        blocks = raw.reshape(batch, 3, f, f, frames, height, width).permute(0, 1, 4, 5, 2, 6, 3)
        return blocks.reshape(batch, 3, frames, height * f, width * f)


def make_codec(vae: Any) -> WanCodec | SpaceToDepthCodec:
    """The codec for a loaded Wan VAE, or for a space-to-depth config (a dict with its `_class_name`)."""
    if isinstance(vae, dict):
        if vae.get("_class_name") != SPACE_TO_DEPTH:
            raise ValueError(f"unknown codec config {vae.get('_class_name')!r}")
        return SpaceToDepthCodec(vae)
    return WanCodec(vae)


def is_space_to_depth(config: dict) -> bool:
    return config.get("_class_name") == SPACE_TO_DEPTH
