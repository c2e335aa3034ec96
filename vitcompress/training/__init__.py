"""Fine-tuning: the distillation loop (explicit arguments), checkpoints, training data, torchrun processes."""
