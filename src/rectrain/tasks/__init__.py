"""LightningModules and the LightningDataModule: what is trained how, around plain models and data."""
