"""Training: torchrun + FSDP2, the three Motus stages, sharded checkpoints with exact resume."""
