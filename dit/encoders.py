"""The frozen encoders of dataset preparation: a diffusers VAE and a transformers T5-style text encoder.

Both load by Hugging Face hub name or local folder (the ``save_pretrained`` layout; ``subfolder``
for pipeline repositories), and run in inference mode on the GPU in bf16 when there is one, else in
fp32 on the CPU.

Latents are the mean of the VAE's posterior (deterministic, so a rerun rewrites a shard
with the same values), normalised as diffusers pipelines do before denoising:
``(z - shift) * scaling_factor / std``, with shift = ``latents_mean`` or ``shift_factor`` and
std = ``latents_std`` from the VAE's config (0 and 1 where absent). Videos: a VAE with 3D
convolutions (AutoencoderKLWan, ...HunyuanVideo, ...LTXVideo, ...) encodes each clip whole, with
its temporal compression; an image VAE (AutoencoderKL) encodes every frame on its own and keeps the
time axis, so the latent has one frame per video frame.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dit.errors import ConfigError


def _device() -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def check_source(flag: str, name: str) -> str:
    """``name`` as a local folder when it is one, else as a hub name; a path that does not exist is a ConfigError."""
    local = Path(name).expanduser()
    if local.exists():
        return str(local)
    if local.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
        raise ConfigError(
            flag, f"{name} does not exist; give a folder written by save_pretrained or a hub name such as org/model"
        )
    return name


def load_pretrained(flag: str, load: Callable[..., Any], name: str, subfolder: str | None, **kwargs: Any) -> Any:
    """``load(name, subfolder=..., **kwargs)``, with a user's wrong name or folder as a ConfigError on ``flag``."""
    source = check_source(flag, name)
    try:
        return load(source, **({"subfolder": subfolder} if subfolder else {}), **kwargs)
    except (OSError, ValueError) as e:
        reason = (str(e).strip() or type(e).__name__).splitlines()[0][:300]
        raise ConfigError(
            flag, f"cannot load {name}" + (f" (subfolder {subfolder})" if subfolder else "") + f": {reason}"
        ) from None


def _per_channel(value: float | list[float]) -> torch.Tensor:
    """A config scalar, or per-channel list, as a tensor that broadcasts over ``[N, C, T, H, W]``."""
    t = torch.as_tensor(value, dtype=torch.float32)
    return t.reshape(1, -1, 1, 1, 1) if t.dim() else t


class VaeEncoder:
    """Pixels ``[N, T, 3, H, W]`` uint8 -> normalised latents ``[N, C, T', H/s, W/s]``, and back (sampling)."""

    def __init__(self, name: str, subfolder: str | None = None, batch_size: int = 8):
        from diffusers import AutoModel

        self.device, self.dtype = _device()
        vae = load_pretrained("--vae", AutoModel.from_pretrained, name, subfolder, torch_dtype=self.dtype)
        if not hasattr(vae, "encode"):
            raise ConfigError("--vae", f"{name} is a {type(vae).__name__}, not an autoencoder")
        self.vae = vae.to(self.device).eval()
        config = vae.config
        # a video VAE is fed whole clips [B, 3, T, H, W]; an image VAE single frames [B, 3, H, W]
        self.video = any(isinstance(m, torch.nn.Conv3d) for m in vae.modules())
        blocks = config.get("block_out_channels")
        self.spatial = int(
            getattr(vae, "spatial_compression_ratio", None)
            or config.get("scale_factor_spatial")
            or (2 ** (len(blocks) - 1) if blocks else 0)
        )
        if not self.spatial:
            raise ConfigError(
                "--vae",
                f"cannot tell the spatial compression of {type(vae).__name__}; "
                "its config has no scale_factor_spatial or block_out_channels",
            )
        self.temporal = 1
        if self.video:
            self.temporal = int(
                getattr(vae, "temporal_compression_ratio", None) or config.get("scale_factor_temporal") or 0
            )
            if not self.temporal:
                raise ConfigError(
                    "--vae",
                    f"cannot tell the temporal compression of {type(vae).__name__}; "
                    "its config has no scale_factor_temporal",
                )
        self.batch_size = batch_size
        self.shift = _per_channel(config.get("latents_mean") or config.get("shift_factor") or 0.0)
        self.scale = (config.get("scaling_factor") or 1.0) / _per_channel(config.get("latents_std") or 1.0)

    def latent_frames(self, frames: int) -> int:
        return frames if not self.video else 1 + (frames - 1) // self.temporal

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(self.device).to(self.dtype) / 127.5 - 1.0
        out = self.vae.encode(x)
        z = out.latent_dist.mode() if hasattr(out, "latent_dist") else out.latent  # a KL VAE, or a deterministic one
        return z.float().cpu()

    @torch.inference_mode()
    def encode(self, clips: torch.Tensor) -> torch.Tensor:
        n, t, _, h, w = clips.shape
        if self.video:  # whole clips: [B, 3, T, H, W]
            z = torch.cat([self._encode(c.permute(0, 2, 1, 3, 4)) for c in clips.split(self.batch_size)])
        else:  # single frames: [B, 3, H, W], then the time axis back
            z = torch.cat([self._encode(f) for f in clips.flatten(0, 1).split(self.batch_size)])
            z = z.unflatten(0, (n, t)).transpose(1, 2)
        expected = (n, self.latent_frames(t), h // self.spatial, w // self.spatial)
        if (z.shape[0], *z.shape[2:]) != expected:
            raise RuntimeError(
                f"the VAE turned {tuple(clips.shape)} pixels into latents {tuple(z.shape)}, not "
                f"[N, C, T', H', W'] = {expected} (its stated compression "
                f"{self.temporal}x{self.spatial}x{self.spatial} is wrong)"
            )
        return (z - self.shift) * self.scale

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``[N, C, T', H', W']`` -> pixels ``[N, T, 3, H, W]`` uint8 (the inverse of encode)."""
        z = latents.float() / self.scale + self.shift
        frames = []
        for batch in z.split(self.batch_size):
            if self.video:  # whole clips: [B, C, T', H', W'] -> [B, 3, T, H, W]
                x = self.vae.decode(batch.to(self.device, self.dtype)).sample.float().cpu().transpose(1, 2)
            else:  # each latent frame on its own
                flat = batch.transpose(1, 2).flatten(0, 1).to(self.device, self.dtype)  # [B*T', C, H', W']
                x = self.vae.decode(flat).sample.float().cpu().unflatten(0, (batch.shape[0], batch.shape[2]))
            frames.append(x)
        return ((torch.cat(frames).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class TextEncoder:
    """Captions -> one embedding ``[L_i, D]`` each, at its true length (padding tokens removed)."""

    def __init__(
        self, name: str, subfolder: str | None = None, tokenizer_subfolder: str | None = None, max_length: int = 512
    ):
        from transformers import AutoModelForTextEncoding, AutoTokenizer

        self.device, self.dtype = _device()
        self.tokenizer = load_pretrained("--text-encoder", AutoTokenizer.from_pretrained, name, tokenizer_subfolder)
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise ConfigError("--text-encoder", f"the tokenizer of {name} has neither a pad nor an eos token")
            self.tokenizer.pad_token = self.tokenizer.eos_token  # padded positions are dropped anyway
        self.tokenizer.padding_side = "right"  # so that each caption's tokens come first
        model = load_pretrained(
            "--text-encoder", AutoModelForTextEncoding.from_pretrained, name, subfolder, dtype=self.dtype
        )
        self.model = model.to(self.device).eval()
        self.max_length = max_length

    @torch.inference_mode()
    def encode(self, captions: list[str]) -> list[torch.Tensor]:
        batch = self.tokenizer(
            captions, padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        lengths = batch.attention_mask.sum(dim=1).tolist()
        return [h[:length].float().cpu() for h, length in zip(hidden, lengths)]
