"""Megatron-Core native DiT pretraining: model, diffusion, training loop and runtime."""
