"""Training data: the latent dataset that the preprocessing job writes and the training job reads.

`pusa_ray.data.latents` defines the shard format (docs/shard-format.md) and its reader. Nothing
here imports Ray: the reader works in any process, with or without a cluster.
"""
