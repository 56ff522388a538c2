"""Does a model use a caption word? Its velocity loss on held-out shape clips with the true caption
against the same caption with one word swapped (the direction, or the colour as a reference).

A model that follows the direction word predicts clips moving that way better under the true
direction than under a wrong one, most of all at high noise, where the noisy video alone does not
tell the direction. A gap near 0 means the word is ignored, whatever the sampler then does.

    python bench/caption_probe.py --model pusa-mini [--clips 32] [--sigmas 0.99,0.95,0.9,0.7]
    python bench/caption_probe.py --model pusa-mini-base --adapter out/.../adapter.safetensors  # a checkpoint

Two configurations per sigma: T2V (every frame at sigma) and I2V (frame 0 clean, the others at
sigma; the loss is over frames 1..F-1). Clips come from the shapes domain at the model's size
(`--travel`, `--start` as the model was trained: pusa-mini uses 0.25 and centre). Same noise for
every caption; prints one table.
"""

from __future__ import annotations

import argparse

import torch

from pusa_ray.flow import add_noise, velocity_target
from pusa_ray.mini.shapes import COLOURS, DIRECTIONS, STARTS, DomainSettings, clips
from pusa_ray.models.loading import apply_adapters, load_components
from pusa_ray.models.text import encode_prompts
from pusa_ray.timesteps import sigma_to_timestep
from pusa_ray.video import frames_to_tensor


def swapped(caption: str, word: str, options: list[str]) -> list[str]:
    """`caption` once for every option other than its own `word` (the same position, another value)."""
    return [caption.replace(f" {word}", f" {other}", 1) for other in options if other != word]


@torch.no_grad()
def frame_losses(model, latents, noise, sigmas, context) -> torch.Tensor:
    """Per-sample velocity MSE `[B]` over the frames with sigma > 0."""
    noisy = add_noise(latents, noise, sigmas)
    error = (model(noisy, sigma_to_timestep(sigmas), context) - velocity_target(latents, noise)) ** 2
    per_frame = error.mean(dim=(1, 3, 4))  # [B, F]
    noised = (sigmas > 0).float()
    return (per_frame * noised).sum(1) / noised.sum(1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="pusa-mini")
    parser.add_argument(
        "--adapter", action="append", default=[], help="a LoRA adapter to merge at alpha 1 (repeatable)"
    )
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--sigmas", default="0.99,0.95,0.9,0.7")
    parser.add_argument("--travel", type=float, default=0.25)
    parser.add_argument("--start", default="centre", choices=STARTS)
    parser.add_argument("--seed", type=int, default=10_000, help="held-out clip seed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    components = load_components(args.model, device="cpu")
    apply_adapters(components, [(adapter, 1.0) for adapter in args.adapter])
    spec = components.spec
    domain = DomainSettings(
        frames=spec.frames, height=spec.height, width=spec.width, travel=args.travel, start=args.start
    )
    truths, frames = zip(*clips(domain, args.clips, args.seed), strict=True)
    pixels = torch.stack([frames_to_tensor(clip) for clip in frames])  # [B, 3, F, H, W]
    latents = components.codec.encode(pixels)  # [B, C, F, h, w]
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))

    def embed(captions: list[str]) -> torch.Tensor:
        return encode_prompts(components.tokenizer, components.text_encoder, captions, spec.text_length)

    true_context = embed([t.caption for t in truths])
    wrong = {
        "direction": [swapped(t.caption, t.direction, list(DIRECTIONS)) for t in truths],
        "colour": [swapped(t.caption, t.colour, list(COLOURS)) for t in truths],
    }
    print(f"{args.model}: {args.clips} held-out clips (seed {args.seed}), {domain.frames} frames")
    print("config  sigma  loss(true)  gap(wrong direction)  gap(wrong colour)")
    for config in ("t2v", "i2v"):
        for sigma in (float(s) for s in args.sigmas.split(",")):
            sigmas = torch.full(latents.shape[:1] + latents.shape[2:3], sigma)  # [B, F]
            if config == "i2v":
                sigmas[:, 0] = 0.0
            true_loss = frame_losses(components.model, latents, noise, sigmas, true_context)
            gaps = {}
            for word, variants in wrong.items():
                losses = [
                    frame_losses(components.model, latents, noise, sigmas, embed([v[k] for v in variants]))
                    for k in range(len(variants[0]))
                ]
                gaps[word] = float((torch.stack(losses).mean(0) - true_loss).mean())
            print(
                f"{config:6s}  {sigma:5.2f}  {float(true_loss.mean()):10.4f}  "
                f"{gaps['direction']:+20.4f}  {gaps['colour']:+17.4f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
