"""Layer 1: how work runs and lands: device sharding, multi-host setup, orbax checkpoints, the persistent compilation cache, atomic result files and progress. Imports only ``core``."""
