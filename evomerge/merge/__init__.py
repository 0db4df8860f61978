"""Merge engine: merge methods (`methods`, one module each), layer groups (`groups`), a disk->disk merger
(`stream.merge_to_disk`) and an in-memory candidate merger (`memory.InMemoryMerger`).

The search calls `InMemoryMerger.merge` thousands of times; `merge_to_disk` writes a recipe's final model.
Both run the same per-tensor math (`methods.merge_tensor`) on a chosen device (`device="cuda"`: every tensor
a method or statistic uses is moved there), so a candidate equals its disk twin bit for bit on the same device.
"""
