"""maskloop: mask-text consistency training for pixel-grounded multimodal LLMs."""
__version__ = "0.1.0"
