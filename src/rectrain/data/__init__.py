"""Interaction logs: reading, synthetic generation, preprocessing, splits, caching and batching.

Nothing here imports Lightning; the LightningDataModule lives in ``rectrain.tasks``.
"""
