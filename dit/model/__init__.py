"""The network: DiTConfig and sizes, the layer spec, attention, embeddings, adaLN, initialisation, and the
packed (THD) sequence types it reads. Imports nothing from the diffusion process, training or data."""
