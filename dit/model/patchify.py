"""Latents <-> patch tokens, shared by the data path (patchify) and the model (unpatchify).

A latent ``[C, T, H, W]`` becomes ``(T/pt)*(H/ph)*(W/pw)`` tokens of width ``pt*ph*pw*C``, in
(t, h, w) raster order, each with its integer (t, h, w) patch coordinate for 3D position
embeddings. Images are ``[C, H, W]`` (T = 1); the temporal patch must then be 1.
"""

from __future__ import annotations

import torch


def as_video(latent: torch.Tensor) -> torch.Tensor:
    """``[C, H, W]`` -> ``[C, 1, H, W]``; ``[C, T, H, W]`` unchanged; anything else is an error."""
    if latent.dim() == 3:
        return latent.unsqueeze(1)
    if latent.dim() != 4:
        raise ValueError(f"a latent must be [C, T, H, W] or [C, H, W], got shape {tuple(latent.shape)}")
    return latent


def grid_size(shape: tuple[int, ...], patch: int, temporal_patch: int) -> tuple[int, int, int]:
    """The patch grid (T', H', W') of a latent ``[C, T, H, W]``; raises when a side is not divisible."""
    _, t, h, w = shape
    for name, side, p in (("frames", t, temporal_patch), ("height", h, patch), ("width", w, patch)):
        if side % p:
            raise ValueError(f"latent {name} {side} is not divisible by its patch size {p}")
    return t // temporal_patch, h // patch, w // patch


def patchify(latent: torch.Tensor, patch: int, temporal_patch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Return tokens ``[L, pt*ph*pw*C]`` and positions ``[L, 3]`` (int64 t, h, w) of one latent."""
    x = as_video(latent)
    c = x.shape[0]
    gt, gh, gw = grid_size(tuple(x.shape), patch, temporal_patch)
    x = x.reshape(c, gt, temporal_patch, gh, patch, gw, patch)
    x = x.permute(1, 3, 5, 2, 4, 6, 0)  # [T', H', W', pt, ph, pw, C]
    tokens = x.reshape(gt * gh * gw, temporal_patch * patch * patch * c)
    positions = torch.stack(
        torch.meshgrid(torch.arange(gt), torch.arange(gh), torch.arange(gw), indexing="ij"), dim=-1
    ).reshape(-1, 3)
    return tokens, positions


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int, int], patch: int, temporal_patch: int = 1) -> torch.Tensor:
    """Inverse of :func:`patchify`: tokens ``[L, pt*ph*pw*C]`` of grid (T', H', W') -> ``[C, T, H, W]``."""
    gt, gh, gw = grid
    c = tokens.shape[-1] // (temporal_patch * patch * patch)
    if tokens.shape[0] != gt * gh * gw or c * temporal_patch * patch * patch != tokens.shape[-1]:
        raise ValueError(
            f"{tuple(tokens.shape)} tokens do not fit grid {grid} with patch {temporal_patch}x{patch}x{patch}"
        )
    x = tokens.reshape(gt, gh, gw, temporal_patch, patch, patch, c)
    x = x.permute(6, 0, 3, 1, 4, 2, 5)  # [C, T', pt, H', ph, W', pw]
    return x.reshape(c, gt * temporal_patch, gh * patch, gw * patch)
