"""Vectorized timestep adaptation (VTA) over diffusers' Wan DiT.

`VTAWanTransformer` wraps an unmodified `WanTransformer3DModel` (same checkpoints, same peft
adapters) and accepts one timestep per latent frame `[B, F]`. Uniform timesteps take diffusers'
own scalar forward. Otherwise the time embedding and the (shift, scale, gate) modulation are
computed per frame `[B, F, 6, D]` and broadcast over each frame's tokens, instead of diffusers'
per-token path that materialises `[B, L, 6, D]` (GBs at 14B/480p) for identical numbers.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanTransformerBlock
from torch import nn

if TYPE_CHECKING:
    from pusa_ray.step_cache import FirstBlockCache


class FrameRuns:
    """Which frames a contiguous range [start, end) of frame-major tokens covers, as at most three
    runs of (first frame, frames, tokens per frame): a partial frame, whole frames, a partial
    frame. Per-frame modulation is applied run by run, never expanded to one row per token. The
    whole video (`FrameRuns.whole`) is one run, with the arithmetic of the unsplit path."""

    def __init__(self, runs: list[tuple[int, int, int]]) -> None:
        self.runs = runs

    @classmethod
    def whole(cls, frames: int, tokens: int) -> FrameRuns:
        return cls([(0, frames, tokens // frames)])

    @classmethod
    def of_range(cls, start: int, end: int, per_frame: int) -> FrameRuns:
        if end <= start:
            raise ValueError(f"an empty token range [{start}, {end})")
        runs, position = [], start
        while position < end:
            frame, offset = divmod(position, per_frame)
            if offset or end - position < per_frame:  # a partial frame
                count = min(per_frame - offset, end - position)
                runs.append((frame, 1, count))
            else:  # whole frames, as many as fit
                count = (end - position) // per_frame * per_frame
                runs.append((frame, count // per_frame, per_frame))
            position += count
        return cls(runs)

    def _apply(self, function, *tensors: torch.Tensor) -> torch.Tensor:
        """`function(first, frames, *run_slices)` per run, [B, n, D] slices framed [B, f, n/f, D]."""
        parts, position = [], 0
        for first, frames, per_frame in self.runs:
            size = frames * per_frame
            framed = [t[:, position : position + size].unflatten(1, (frames, per_frame)) for t in tensors]
            parts.append(function(first, frames, *framed).flatten(1, 2))
            position += size
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def modulate(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """x [B, n, D] * (1 + scale) + shift, with scale and shift [B, F, 1, D] per frame."""
        return self._apply(lambda f, k, framed: framed * (1 + scale[:, f : f + k]) + shift[:, f : f + k], x)

    def gate(self, x: torch.Tensor, update: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """x + update * gate, with gate [B, F, 1, D] per frame."""
        return self._apply(lambda f, k, framed, more: framed + more * gate[:, f : f + k], x, update)


def vta_block_forward(
    block: WanTransformerBlock,
    hidden_states: torch.Tensor,  # [B, L, D]
    context: torch.Tensor,  # [B, L_text, D]
    modulation: torch.Tensor,  # [B, F, 6, D]
    rotary_emb: tuple[torch.Tensor, torch.Tensor],
    runs: FrameRuns | None = None,  # which frames the tokens belong to (None: all F frames, whole)
) -> torch.Tensor:
    """One Wan block with per-frame modulation; numerically the block's own per-token branch."""
    runs = runs or FrameRuns.whole(modulation.shape[1], hidden_states.shape[1])
    table = block.scale_shift_table.unsqueeze(0) + modulation.float()  # [B, F, 6, D]
    shift_msa, scale_msa, gate_msa, c_shift, c_scale, c_gate = table.chunk(6, dim=2)  # [B, F, 1, D] each
    dtype = hidden_states.dtype

    normed = runs.modulate(block.norm1(hidden_states.float()), scale_msa, shift_msa)
    attn = block.attn1(normed.to(dtype), None, None, rotary_emb)
    hidden_states = runs.gate(hidden_states.float(), attn, gate_msa).to(dtype)

    normed = block.norm2(hidden_states.float()).to(dtype)
    hidden_states = hidden_states + block.attn2(normed, context, None, None)

    normed = runs.modulate(block.norm3(hidden_states.float()), c_scale, c_shift)
    ff = block.ffn(normed.to(dtype))
    return runs.gate(hidden_states.float(), ff.float(), c_gate).to(dtype)


class VTAWanTransformer(nn.Module):
    """A Wan DiT that takes per-frame timesteps; `transformer` stays a plain diffusers model."""

    def __init__(self, transformer: WanTransformer3DModel) -> None:
        super().__init__()
        if tuple(transformer.config.patch_size)[0] != 1:
            raise ValueError(f"VTA needs a temporal patch size of 1, got {transformer.config.patch_size}")
        self.transformer = transformer
        self.block_forward = vta_block_forward  # `compile_blocks` swaps in a compiled one

    def compile_blocks(self) -> None:
        """Compile the repeated block with dynamic shapes, so a new resolution or frame count does
        not recompile per request: our per-frame block function (`torch.compile`) and, for the
        uniform-timestep path, diffusers' own blocks (`compile_repeated_blocks`, regional)."""
        self.block_forward = torch.compile(vta_block_forward, dynamic=True)
        self.transformer.compile_repeated_blocks(dynamic=True)

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def forward(
        self,
        latents: torch.Tensor,  # [B, C, F, H, W]
        timesteps: torch.Tensor,  # [B, F] per latent frame, or [B]
        context: torch.Tensor,  # [B, L_text, text_dim]
        cache: FirstBlockCache | None = None,
    ) -> torch.Tensor:
        """Velocity `[B, C, F, H, W]` (float32) for per-frame timesteps; `cache` (one per video)
        may skip blocks between steps (`pusa_ray.step_cache`)."""
        if timesteps.ndim == 2 and timesteps.shape != latents.shape[:1] + latents.shape[2:3]:
            raise ValueError(
                f"timesteps {tuple(timesteps.shape)} do not match latents {tuple(latents.shape)}"
            )
        latents = latents.to(self.dtype)
        context = context.to(self.dtype)
        uniform = timesteps.ndim == 1 or bool((timesteps == timesteps[:, :1]).all())
        if cache is not None:
            return self._cached_forward(latents, timesteps, context, cache, uniform).float()
        if uniform:
            scalar = timesteps if timesteps.ndim == 1 else timesteps[:, 0]
            return self.transformer(latents, scalar, context, return_dict=False)[0].float()
        return self.per_frame_forward(latents, timesteps, context).float()

    def embed(
        self, latents: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """What the per-frame blocks take: tokens [B, L, D], the embedded text context, the
        modulation [B, F, 6, D], the time embedding [B, F, D] (for the head) and the rotary
        embedding ([1, L, 1, d] each), for timesteps [B, F]."""
        model = self.transformer
        rotary_emb = model.rope(latents)
        hidden_states = model.patch_embedding(latents).flatten(2).transpose(1, 2).contiguous()  # [B, L, D]
        temb, timestep_proj, context, _ = model.condition_embedder(
            timesteps.flatten(), context, None, timestep_seq_len=latents.shape[2]
        )  # temb [B, F, D], timestep_proj [B, F, 6D]
        return hidden_states, context, timestep_proj.unflatten(2, (6, -1)), temb, rotary_emb

    def per_frame_forward(
        self, latents: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor
    ) -> torch.Tensor:
        """The VTA path: modulation per frame, broadcast over the frame's tokens."""
        model = self.transformer
        hidden_states, context, modulation, temb, rotary_emb = self.embed(latents, timesteps, context)

        checkpointing = torch.is_grad_enabled() and model.gradient_checkpointing
        for block in model.blocks:
            if checkpointing:
                forward = partial(self.block_forward, block)
                hidden_states = model._gradient_checkpointing_func(
                    forward, hidden_states, context, modulation, rotary_emb
                )
            else:
                hidden_states = self.block_forward(block, hidden_states, context, modulation, rotary_emb)

        return self._output(hidden_states, temb, latents.shape)

    def _cached_forward(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        cache: FirstBlockCache,
        uniform: bool,
    ) -> torch.Tensor:
        """Either path (uniform timesteps: diffusers' own blocks and modulation, per frame: the VTA
        blocks) with the blocks run through the step cache. Inference only."""
        model = self.transformer
        if uniform:
            rotary_emb = model.rope(latents)
            hidden_states = model.patch_embedding(latents).flatten(2).transpose(1, 2).contiguous()
            scalar = timesteps if timesteps.ndim == 1 else timesteps[:, 0]
            temb, projection, context, _ = model.condition_embedder(
                scalar, context, None, timestep_seq_len=None
            )
            modulation = projection.unflatten(1, (6, -1))  # [B, 6, D]: what diffusers' forward passes

            def run_block(block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
                return block(hidden, context, modulation, rotary_emb)

            temb = temb[:, None]  # [B, 1, D]: one modulation for all frames in the output head
        else:
            hidden_states, context, modulation, temb, rotary_emb = self.embed(latents, timesteps, context)

            def run_block(block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
                return self.block_forward(block, hidden, context, modulation, rotary_emb)

        hidden_states = cache.run(hidden_states, model.blocks, run_block, latents.shape[2])
        return self._output(hidden_states, temb, latents.shape)

    def _output(self, hidden_states: torch.Tensor, temb: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """The output head (modulated per frame by `temb` [B, F or 1, D]) and unpatchify."""
        runs = FrameRuns.whole(temb.shape[1], hidden_states.shape[1])
        return self.unpatchify(self.head(hidden_states, temb, runs), shape)

    def head(self, hidden_states: torch.Tensor, temb: torch.Tensor, runs: FrameRuns) -> torch.Tensor:
        """The output norm, modulated per frame by `temb` [B, F, D], and projection: [B, n, C*pH*pW]."""
        model = self.transformer
        table = model.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)  # [B, F, 2, D]
        shift, scale = table.chunk(2, dim=2)  # [B, F, 1, D]
        normed = runs.modulate(model.norm_out(hidden_states.float()), scale, shift)
        return model.proj_out(normed.type_as(hidden_states))

    def unpatchify(self, output: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """[B, L, C*pH*pW] tokens -> [B, C, F, H, W] for latents of `shape`."""
        batch, _, frames, height, width = shape
        _, patch_h, patch_w = self.transformer.config.patch_size
        grid_h, grid_w = height // patch_h, width // patch_w
        output = output.reshape(batch, frames, grid_h, grid_w, 1, patch_h, patch_w, -1)
        output = output.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return output.flatten(6, 7).flatten(4, 5).flatten(2, 3)  # [B, C, F, H, W]
