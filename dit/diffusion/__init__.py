"""Diffusion objectives (EDM, rectified flow) and samplers, apart from the network."""
