"""onegen: one LLM that generates text and retrieves documents in a single forward pass."""

__version__ = "0.1.0"
