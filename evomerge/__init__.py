"""evomerge: evolutionary search over model-merge recipes (parameter space and data-flow space)."""

__version__ = "0.1.0"
