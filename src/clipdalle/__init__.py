"""clipdalle: DALL·E and CLIP you can train, run and search with on a laptop CPU."""

__version__ = "0.1.0"
