"""moemesh coordinator: the dense part of an MoE model (embeddings, attention, router, sampling,
chat) on one device, with the experts computed in-process or on expert nodes.

`from coordinator import Engine` is the Python entry point.
"""
from .engine import Engine

__all__ = ["Engine"]
