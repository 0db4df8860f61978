"""The toy zoo: a deterministic miniature of EvoLLM's setting (a base and fine-tuned experts) built on CPU."""
