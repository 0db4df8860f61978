"""The Hydra config tree, read as `pkg://evomerge.conf` (Hydra needs this file to treat the folder as a config module)."""
