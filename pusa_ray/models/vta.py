"""Vectorized timestep adaptation (VTA) over diffusers' Wan DiT.

`VTAWanTransformer` wraps an unmodified `WanTransformer3DModel` (same checkpoints, same peft
adapters) and accepts one timestep per latent frame `[B, F]`. Uniform timesteps take diffusers'
own scalar forward. Otherwise the time embedding and the (shift, scale, gate) modulation are
computed per frame `[B, F, 6, D]` and broadcast over each frame's tokens, instead of diffusers'
per-token path that materialises `[B, L, 6, D]` (GBs at 14B/480p) for identical numbers.
"""

from __future__ import annotations

from functools import partial

import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanTransformerBlock
from torch import nn


def _framed(tokens: torch.Tensor, frames: int) -> torch.Tensor:
    """[B, L, D] -> [B, F, L/F, D]; Wan's tokens are frame-major."""
    return tokens.unflatten(1, (frames, -1))


def vta_block_forward(
    block: WanTransformerBlock,
    hidden_states: torch.Tensor,  # [B, L, D]
    context: torch.Tensor,  # [B, L_text, D]
    modulation: torch.Tensor,  # [B, F, 6, D]
    rotary_emb: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """One Wan block with per-frame modulation; numerically the block's own per-token branch."""
    frames = modulation.shape[1]
    table = block.scale_shift_table.unsqueeze(0) + modulation.float()  # [B, F, 6, D]
    shift_msa, scale_msa, gate_msa, c_shift, c_scale, c_gate = table.chunk(6, dim=2)  # [B, F, 1, D] each
    dtype = hidden_states.dtype

    normed = _framed(block.norm1(hidden_states.float()), frames) * (1 + scale_msa) + shift_msa
    attn = block.attn1(normed.flatten(1, 2).to(dtype), None, None, rotary_emb)
    hidden_states = (_framed(hidden_states.float(), frames) + _framed(attn, frames) * gate_msa).flatten(1, 2)
    hidden_states = hidden_states.to(dtype)

    normed = block.norm2(hidden_states.float()).to(dtype)
    hidden_states = hidden_states + block.attn2(normed, context, None, None)

    normed = _framed(block.norm3(hidden_states.float()), frames) * (1 + c_scale) + c_shift
    ff = block.ffn(normed.flatten(1, 2).to(dtype))
    hidden_states = _framed(hidden_states.float(), frames) + _framed(ff.float(), frames) * c_gate
    return hidden_states.flatten(1, 2).to(dtype)


class VTAWanTransformer(nn.Module):
    """A Wan DiT that takes per-frame timesteps; `transformer` stays a plain diffusers model."""

    def __init__(self, transformer: WanTransformer3DModel) -> None:
        super().__init__()
        if tuple(transformer.config.patch_size)[0] != 1:
            raise ValueError(f"VTA needs a temporal patch size of 1, got {transformer.config.patch_size}")
        self.transformer = transformer

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def forward(
        self,
        latents: torch.Tensor,  # [B, C, F, H, W]
        timesteps: torch.Tensor,  # [B, F] per latent frame, or [B]
        context: torch.Tensor,  # [B, L_text, text_dim]
    ) -> torch.Tensor:
        """Velocity `[B, C, F, H, W]` (float32) for per-frame timesteps."""
        if timesteps.ndim == 2 and timesteps.shape != latents.shape[:1] + latents.shape[2:3]:
            raise ValueError(
                f"timesteps {tuple(timesteps.shape)} do not match latents {tuple(latents.shape)}"
            )
        latents = latents.to(self.dtype)
        context = context.to(self.dtype)
        if timesteps.ndim == 1 or bool((timesteps == timesteps[:, :1]).all()):
            scalar = timesteps if timesteps.ndim == 1 else timesteps[:, 0]
            return self.transformer(latents, scalar, context, return_dict=False)[0].float()
        return self.per_frame_forward(latents, timesteps, context).float()

    def per_frame_forward(
        self, latents: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor
    ) -> torch.Tensor:
        """The VTA path: modulation per frame, broadcast over the frame's tokens."""
        model = self.transformer
        batch, _, frames, height, width = latents.shape
        _, patch_h, patch_w = model.config.patch_size
        rotary_emb = model.rope(latents)
        hidden_states = model.patch_embedding(latents).flatten(2).transpose(1, 2).contiguous()  # [B, L, D]

        temb, timestep_proj, context, _ = model.condition_embedder(
            timesteps.flatten(), context, None, timestep_seq_len=frames
        )  # temb [B, F, D], timestep_proj [B, F, 6D]
        modulation = timestep_proj.unflatten(2, (6, -1))  # [B, F, 6, D]

        checkpointing = torch.is_grad_enabled() and model.gradient_checkpointing
        for block in model.blocks:
            if checkpointing:
                forward = partial(vta_block_forward, block)
                hidden_states = model._gradient_checkpointing_func(
                    forward, hidden_states, context, modulation, rotary_emb
                )
            else:
                hidden_states = vta_block_forward(block, hidden_states, context, modulation, rotary_emb)

        table = model.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)  # [B, F, 2, D]
        shift, scale = table.chunk(2, dim=2)  # [B, F, 1, D]
        normed = _framed(model.norm_out(hidden_states.float()), frames) * (1 + scale) + shift
        output = model.proj_out(normed.flatten(1, 2).type_as(hidden_states))  # [B, L, C*pH*pW]

        grid_h, grid_w = height // patch_h, width // patch_w
        output = output.reshape(batch, frames, grid_h, grid_w, 1, patch_h, patch_w, -1)
        output = output.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return output.flatten(6, 7).flatten(4, 5).flatten(2, 3)  # [B, C, F, H, W]
