"""A synthetic world for proving adaptation without real CLIP weights (see world.py)."""
