"""Checkpoint and adapter formats: Wan2.1 original release, Pusa LoRA, diffusers, ours."""
