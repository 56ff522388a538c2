"""The Ray Serve application: an async video-generation job API over the core sampler."""
