"""The distributed layer: the only package that imports Ray.

`preprocess` is the Ray Data job that turns raw videos and captions into the latent dataset of
`pusa_ray.data.latents`. The core modules never import from here.
"""
