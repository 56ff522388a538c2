"""Step caching that understands per-frame timesteps: a first-block residual cache.

Neighbouring denoising steps change the DiT's output little for much of a schedule. At every step
the first block runs, and the change of its residual (its output minus its input) since the last
*computed* step is measured for each batch row and each latent frame (mean absolute change over
the frame's tokens, relative to the old residual's mean magnitude). When every (row, frame) moved
less than `threshold`, the other blocks are skipped and their residual from the last computed step
is added to the first block's output instead: the rule of FirstBlockCache (diffusers'
`FirstBlockCacheConfig`), measured per frame. (Our default threshold, 0.1, is that of a
per-frame maximum, stricter than diffusers' 0.05 on one global mean.)

Why per frame: with per-frame timesteps (the `lead` schedule; keyframes or clips with noise
multipliers) the frames of one video move along different timestep schedules, so a residual
computed for one timestep vector is reused under the next one only where every frame's own
evidence says it is safe. A frame's first-block residual carries its own timestep's modulation,
so a frame whose timestep moved much shows it there; one global mean would let a few such frames
hide among many frozen ones. (diffusers' cache hooks key on the model's forward and its scalar
step and never see our per-frame blocks, see `models/vta.py`: hence our own, in ~40 lines.)

Why per row: a guided step runs [cond, uncond] as one batch; the decision is shared by both
passes (one skips exactly when the other does) and the worse row decides.

The first step is always computed, at most `max_reuse` steps in a row are reused (errors do not
pile up), and a threshold of 0 reuses nothing: the output then equals the uncached model's bit for
bit. A frozen frame (noise multiplier 0) never moves whatever the cache does: the sampler's step
for it is zero.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pusa_ray.names import parse_cache

BlockRunner = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]  # (block, hidden) -> hidden


@dataclass
class FirstBlockCache:
    """The state of one generation: create one per video (`make_cache`)."""

    threshold: float
    max_reuse: int = 2
    computed: int = 0  # steps whose blocks all ran
    reused: int = 0  # steps that reused the cached residual
    _head: torch.Tensor | None = None  # the first block's residual at the last computed step
    _tail: torch.Tensor | None = None  # the other blocks' residual at the last computed step
    _streak: int = 0

    def reusable(self, head: torch.Tensor, frames: int) -> bool:
        """May this step reuse the cached residual? `head` [B, L, D] with frame-major tokens."""
        previous = self._head
        if self.threshold <= 0 or previous is None or previous.shape != head.shape:
            return False
        if self._streak >= self.max_reuse:
            return False
        change = (head.float() - previous.float()).abs().unflatten(1, (frames, -1)).mean(dim=(2, 3))
        scale = previous.float().abs().unflatten(1, (frames, -1)).mean(dim=(2, 3)).clamp_min(1e-12)
        return bool((change / scale < self.threshold).all())  # every row, every frame

    def run(
        self, hidden: torch.Tensor, blocks: Sequence[torch.nn.Module], run_block: BlockRunner, frames: int
    ) -> torch.Tensor:
        """The blocks' output for this step: all of them, or the first one plus the cached rest."""
        first = run_block(blocks[0], hidden)
        head = first - hidden
        if self._tail is not None and self.reusable(head, frames):
            self.reused += 1
            self._streak += 1
            return first + self._tail
        output = first
        for block in blocks[1:]:
            output = run_block(block, output)
        self._head, self._tail = head, output - first
        self.computed += 1
        self._streak = 0
        return output


def make_cache(spec: str | None) -> FirstBlockCache | None:
    """A fresh cache for one generation from a `cache` setting (`names.parse_cache`); None: off."""
    if spec is None:
        return None
    policy, threshold, max_reuse = parse_cache(spec)
    return FirstBlockCache(threshold, max_reuse) if policy == "first-block" else None
