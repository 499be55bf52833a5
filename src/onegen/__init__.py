"""onegen: one LLM that generates text and retrieves documents in a single forward pass.

Public API: `OneGenModel`, `train`, `TrainConfig`, `Index`, `Engine` (imported lazily, so that
`import onegen` stays cheap and the CLI starts fast).
"""

import os as _os

# faiss and torch each bring an OpenMP runtime; spinning faiss threads slow torch down on small CPUs.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.3.0.dev0"

__all__ = ["OneGenModel", "train", "TrainConfig", "Index", "Engine", "__version__"]


def __getattr__(name: str):
    if name == "OneGenModel":
        from .model import OneGenModel

        return OneGenModel
    if name == "train":
        from .trainer import train

        return train
    if name == "TrainConfig":
        from .config import TrainConfig

        return TrainConfig
    if name == "Index":
        from .index import Index

        return Index
    if name == "Engine":
        from .engine import Engine

        return Engine
    raise AttributeError(f"module 'onegen' has no attribute {name!r}")
