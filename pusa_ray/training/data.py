"""Which clips a training step sees, and the noise and timesteps it draws: pure functions of the step.

The training data is one stream of record indices: epoch `e` is a permutation of the training
records drawn from `(seed, e)`, and the epochs follow one another. Step `s` (0-based) consumes the
slots `s * P .. s * P + P - 1` of the stream, `P = workers * accumulation * batch` clips; slot
`s * P + (micro * workers + rank) * batch + b` goes to micro-batch `micro`, rank `rank`, row `b`.
A sample's noise and per-frame timesteps are drawn from a generator seeded by `(seed, slot)`.

So everything a step sees follows from the step number: a run resumed at step `s` sees exactly
the clips, noise and timesteps an uninterrupted run would, with no sampler state to checkpoint.
Ray Data's streaming split cannot resume at a position, which is why the order is owned here and
records are read by index from the committed dataset.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pusa_ray.data.latents import LatentDataset, LatentRecord
from pusa_ray.training.config import TimestepSettings

__all__ = [
    "Batch",
    "DataLayout",
    "ProbeSet",
    "build_probe_set",
    "load_batch",
    "mix_seed",
    "split_records",
]


def mix_seed(*parts: object) -> int:
    """A 63-bit seed from any tuple of values, identical in every process (unlike `hash`)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def split_records(count: int, probe_samples: int, hold_out: bool, seed: int) -> tuple[list[int], list[int]]:
    """(training indices, probe indices) of a dataset of `count` records.

    The probe records are the first `probe_samples` of a permutation drawn from `seed`; with
    `hold_out` they are excluded from training.
    """
    order = torch.randperm(count, generator=torch.Generator().manual_seed(mix_seed("probe-split", seed)))
    probe = sorted(order[: min(probe_samples, count)].tolist())
    train = sorted(set(range(count)) - set(probe)) if hold_out else list(range(count))
    return train, probe


@dataclass(frozen=True)
class DataLayout:
    """How the stream of training records is cut into steps, micro-batches, ranks and rows."""

    train_indices: tuple[int, ...]
    seed: int
    world_size: int
    batch_size: int
    accumulation: int

    @property
    def samples_per_step(self) -> int:
        return self.world_size * self.batch_size * self.accumulation

    def slots(self, step: int, micro: int, rank: int) -> list[int]:
        """Stream slots of micro-batch `micro` of 0-based step `step` on `rank`."""
        first = step * self.samples_per_step + (micro * self.world_size + rank) * self.batch_size
        return list(range(first, first + self.batch_size))

    def epoch_of(self, slot: int) -> int:
        return slot // len(self.train_indices)

    def record_index(self, slot: int) -> int:
        """The dataset index at stream position `slot`."""
        epoch, position = divmod(slot, len(self.train_indices))
        return self.train_indices[int(self._permutation(epoch)[position])]

    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(mix_seed("epoch", self.seed, epoch))
        return torch.randperm(len(self.train_indices), generator=generator)


@dataclass
class Batch:
    """One micro-batch: clean latents, text context, noise and per-frame sigmas with loss weights."""

    latents: torch.Tensor  # [B, C, F, h, w] float32, normalised space
    context: torch.Tensor  # [B, L, D] float32
    noise: torch.Tensor  # [B, C, F, h, w] float32
    sigmas: torch.Tensor  # [B, F] float32 in [0, 1]
    weights: torch.Tensor  # [B, F] float32 loss weights

    def to(self, device: torch.device) -> Batch:
        return Batch(*(tensor.to(device, non_blocking=True) for tensor in self._tensors()))

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.latents, self.context, self.noise, self.sigmas, self.weights)

    def __len__(self) -> int:
        return self.latents.shape[0]


def draw_noise_and_sigmas(
    record: LatentRecord, seed: int, timesteps: TimestepSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noise [C, F, h, w], sigmas [F], weights [F]) for one record from one seed, on the CPU."""
    generator = torch.Generator().manual_seed(seed)
    frames = record.latents.shape[1]
    sigmas, weights = timesteps.draw(1, frames, generator)  # [1, F]
    noise = torch.randn(record.latents.shape, generator=generator)  # [C, F, h, w]
    return noise, sigmas[0], weights[0]


def collate(records: Sequence[LatentRecord], seeds: Sequence[int], timesteps: TimestepSettings) -> Batch:
    """Stack records and draw each one's noise and timesteps from its own seed."""
    drawn = [draw_noise_and_sigmas(r, s, timesteps) for r, s in zip(records, seeds, strict=True)]
    return Batch(
        latents=torch.stack([record.latents for record in records]),  # [B, C, F, h, w]
        context=torch.stack([record.context for record in records]),  # [B, L, D]
        noise=torch.stack([noise for noise, _, _ in drawn]),
        sigmas=torch.stack([sigmas for _, sigmas, _ in drawn]),  # [B, F]
        weights=torch.stack([weights for _, _, weights in drawn]),  # [B, F]
    )


def load_batch(
    dataset: LatentDataset | Sequence[LatentRecord],
    layout: DataLayout,
    step: int,
    micro: int,
    rank: int,
    timesteps: TimestepSettings,
    caption_dropout: float = 0.0,
    null_context: torch.Tensor | None = None,
) -> Batch:
    """The micro-batch `micro` of 0-based step `step` on `rank` (see the module docstring).

    With `caption_dropout` > 0, each slot's context is replaced by `null_context` ([L, D], the
    empty prompt's embedding) with that probability, decided by the slot's own seed.
    """
    slots = layout.slots(step, micro, rank)
    records = [dataset[layout.record_index(slot)] for slot in slots]
    seeds = [mix_seed("sample", layout.seed, slot) for slot in slots]
    batch = collate(records, seeds, timesteps)
    if caption_dropout > 0:
        if null_context is None:
            raise ValueError("caption_dropout needs the null context")
        for row, slot in enumerate(slots):
            draw = torch.rand(
                1, generator=torch.Generator().manual_seed(mix_seed("caption", layout.seed, slot))
            )
            if draw.item() < caption_dropout:
                batch.context[row] = null_context
    return batch


@dataclass
class ProbeSet:
    """Fixed validation samples: the same latents, noise and timesteps at every evaluation."""

    batch: Batch
    indices: tuple[int, ...]  # dataset indices

    def shard(self, rank: int, world_size: int) -> Batch | None:
        """This rank's share of the probe samples (every `world_size`-th), or None if it has none."""
        rows = list(range(rank, len(self.batch), world_size))
        if not rows:
            return None
        return Batch(*(tensor[rows] for tensor in self.batch._tensors()))


def build_probe_set(
    dataset: LatentDataset | Sequence[LatentRecord],
    indices: Sequence[int],
    seed: int,
    timesteps: TimestepSettings,
) -> ProbeSet:
    """Probe samples for `indices`, each with noise and timesteps drawn from `(seed, position)`."""
    records = [dataset[index] for index in indices]
    seeds = [mix_seed("probe", seed, position) for position in range(len(indices))]
    return ProbeSet(collate(records, seeds, timesteps), tuple(indices))
