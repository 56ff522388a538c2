"""The distributed layer: the only package that imports Ray (and DeepSpeed).

`preprocess` is the Ray Data job that turns raw videos and captions into the latent dataset of
`pusa_ray.data.latents`; the training loop and batch generation live beside it. The core modules
never import from here.
"""
