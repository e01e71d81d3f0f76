"""The process around the model: distributed set-up and seeds, the CPU backend, Megatron-Core version
differences, and how a command reports a user's mistake. Imports nothing from the model up."""
