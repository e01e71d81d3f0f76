"""Megatron-Core native DiT pretraining, by layer: training, sampling (`generate`) and export (`convert`) over
the checkpoint files (`checkpoint`), the diffusion process, the model and the runtime."""
