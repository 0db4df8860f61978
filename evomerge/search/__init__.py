"""Searches over merge recipes: genomes, optimizers, the shared run loop, and the PS problem."""
