"""Task checkpoints on durable storage (any fsspec URL), safe archives and ``latest_checkpoint``."""
