"""LightningDataModules: real digits, teacher trajectories (read from the store)."""
