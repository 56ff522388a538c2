"""Sequence parallelism: one video's DiT forward across the N ranks of a process group (Ulysses).

Each rank holds a contiguous range of the video's tokens (they are frame-major; when N does not
divide the count, the first ranks hold one more). Whatever is per token runs on the local range:
the norms, the FFN, cross-attention over the text context (replicated on every rank) and the
per-frame modulation, applied to each local run of a frame's tokens (`FrameRuns`: a range may
start or end inside a frame). Self-attention needs every token: an all-to-all turns the local
[tokens/N, all heads] query, key and value into [all tokens, heads/N] (Ulysses), each rank attends
with its heads, and a second all-to-all turns the result back. The output head runs locally and
the tokens are all-gathered, so every rank ends the forward with the whole velocity: with the same
seed, every rank takes the same sampler step, and only rank 0 need decode and write.

Why our own and not diffusers' context parallelism (`enable_parallelism(ContextParallelConfig)`):
its plan (`_cp_plan`) splits the hidden states at `blocks.0`'s input and the rope's output through
module hooks, but our per-frame path runs the blocks through `vta_block_forward`, where those
hooks never fire, with a per-frame modulation that the plan knows nothing of. Ours is two
all-to-alls over `torch.distributed` (NCCL on GPUs, gloo on the CPU) and one all-gather.

Communication per forward, per rank: 4 all-to-alls per block (query, key and value in, the result
back) of B x (L/N) x D elements each, and one all-gather of the output (`communication_bytes`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pusa_ray.errors import UserInputError
from pusa_ray.models.vta import FrameRuns, VTAWanTransformer


def token_ranges(tokens: int, world: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges of `tokens` for `world` ranks; the first `tokens % world`
    ranks hold one more."""
    base, extra = divmod(tokens, world)
    ranges, start = [], 0
    for rank in range(world):
        end = start + base + (1 if rank < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges


@dataclass(frozen=True)
class SequenceParallel:
    """This rank's place in a sequence-parallel group (the default group when `group` is None)."""

    rank: int
    world: int
    group: dist.ProcessGroup | None = None

    @classmethod
    def current(cls) -> SequenceParallel:
        return cls(dist.get_rank(), dist.get_world_size())

    # --- the two all-to-alls of Ulysses ------------------------------------------------------
    def gather_tokens(self, local: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """[B, L_r, H, d] (my tokens, every head) -> [B, L, H/N, d] (every token, my heads)."""
        batch, mine, heads, dim = local.shape
        chunks = local.reshape(batch, mine, self.world, heads // self.world, dim)
        send = chunks.permute(2, 1, 0, 3, 4).reshape(self.world * mine, batch, heads // self.world, dim)
        received = send.new_empty(sum(counts), batch, heads // self.world, dim)
        dist.all_to_all_single(received, send.contiguous(), counts, [mine] * self.world, group=self.group)
        return received.permute(1, 0, 2, 3)

    def scatter_tokens(self, full: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """[B, L, H/N, d] (every token, my heads) -> [B, L_r, H, d] (my tokens, every head)."""
        batch, _, part, dim = full.shape
        mine = counts[self.rank]
        send = full.permute(1, 0, 2, 3).contiguous()  # [L, B, H/N, d], split by token ranges
        received = send.new_empty(self.world * mine, batch, part, dim)
        dist.all_to_all_single(received, send, [mine] * self.world, counts, group=self.group)
        return received.reshape(self.world, mine, batch, part, dim).permute(2, 1, 0, 3, 4).flatten(2, 3)

    def all_gather_tokens(self, local: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """[B, L_r, E] on every rank -> [B, L, E] (uneven ranges: padded to the longest, then cut)."""
        longest = max(counts)
        padded = local.new_zeros(local.shape[0], longest, local.shape[2])
        padded[:, : local.shape[1]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded.contiguous(), group=self.group)
        return torch.cat([part[:, :count] for part, count in zip(parts, counts, strict=True)], dim=1)

    # --- the forward -------------------------------------------------------------------------
    @contextlib.contextmanager
    def attention(self, model: VTAWanTransformer, counts: list[int]) -> Iterator[None]:
        """Self-attention of every block through Ulysses for the duration of one forward."""
        transformer = model.transformer
        heads = transformer.config.num_attention_heads
        if heads % self.world:
            raise UserInputError(
                f"sequence parallelism over {self.world} ranks needs heads divisible by it, got {heads}"
            )
        originals = [block.attn1.processor for block in transformer.blocks]
        for block, original in zip(transformer.blocks, originals, strict=True):
            block.attn1.set_processor(UlyssesAttention(self, counts, original))
        try:
            yield
        finally:
            for block, original in zip(transformer.blocks, originals, strict=True):
                block.attn1.set_processor(original)

    @torch.no_grad()
    def forward(
        self, model: VTAWanTransformer, latents: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor
    ) -> torch.Tensor:
        """The velocity `[B, C, F, H, W]` (float32) of the whole video, on every rank; the same
        arguments on every rank (`timesteps` [B] or [B, F])."""
        transformer = model.transformer
        latents, context = latents.to(model.dtype), context.to(model.dtype)
        batch, _, frames, height, width = latents.shape
        _, patch_h, patch_w = transformer.config.patch_size
        per_frame = (height // patch_h) * (width // patch_w)
        ranges = token_ranges(frames * per_frame, self.world)
        if frames * per_frame < self.world:
            raise UserInputError(f"{frames * per_frame} video tokens cannot be split over {self.world} ranks")
        counts = [end - start for start, end in ranges]
        start, end = ranges[self.rank]
        if timesteps.ndim == 1:
            timesteps = timesteps[:, None].expand(batch, frames)  # uniform: one per frame
        hidden, context, modulation, temb, (cos, sin) = model.embed(latents, timesteps, context)
        hidden, rotary_emb = hidden[:, start:end].contiguous(), (cos[:, start:end], sin[:, start:end])
        runs = FrameRuns.of_range(start, end, per_frame)
        with self.attention(model, counts):
            for block in transformer.blocks:
                hidden = model.block_forward(block, hidden, context, modulation, rotary_emb, runs)
        local = model.head(hidden, temb, runs)  # [B, L_r, C * pH * pW]
        return model.unpatchify(self.all_gather_tokens(local, counts), latents.shape).float()


class UlyssesAttention:
    """A self-attention processor for a Wan attention module: the arithmetic of diffusers'
    `WanAttnProcessor` (projections, RMS norms across heads, rotary embedding, attention, output
    projection) with the two all-to-alls around the attention itself."""

    def __init__(self, parallel: SequenceParallel, counts: list[int], original: object) -> None:
        self.parallel, self.counts = parallel, counts
        self.backend = getattr(original, "_attention_backend", None)

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        if encoder_hidden_states is not None or attention_mask is not None or attn.add_k_proj is not None:
            raise ValueError("UlyssesAttention is for the blocks' unmasked self-attention only")
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query, key = _rotate(query, *rotary_emb), _rotate(key, *rotary_emb)
        gather = self.parallel.gather_tokens
        attended = dispatch_attention_fn(
            gather(query, self.counts),
            gather(key, self.counts),
            gather(value, self.counts),
            attn_mask=None,
            dropout_p=0.0,
            is_causal=False,
            backend=self.backend,
        )  # [B, L, H/N, d]
        output = self.parallel.scatter_tokens(attended, self.counts).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](output))


def _rotate(hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on [B, L, H, d] with interleaved (even, odd) pairs."""
    even, odd = hidden.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    rotated = torch.empty_like(hidden)
    rotated[..., 0::2] = even * cos - odd * sin
    rotated[..., 1::2] = even * sin + odd * cos
    return rotated.type_as(hidden)


def communication_bytes(
    batch: int, tokens: int, dim: int, layers: int, out_features: int, world: int, element_bytes: int
) -> int:
    """Bytes one rank sends in one forward: 4 all-to-alls per block (each sends (N-1)/N of its
    B x L/N x D slice) and the all-gather of the output (its B x L/N x E slice to N-1 ranks)."""
    if world == 1:
        return 0
    local = batch * -(-tokens // world)
    per_block = 4 * local * dim * (world - 1) // world
    return element_bytes * (layers * per_block + local * out_features * (world - 1))
