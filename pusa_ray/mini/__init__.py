"""pusa-mini: the procedural shapes domain, its metrics and the small shipped model."""
