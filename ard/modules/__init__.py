"""LightningModules, one per stage: teacher training, trajectory precompute, distillation."""
