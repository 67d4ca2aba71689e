"""Decoder features of a frozen denoiser: what every head learns from.

As in Baranchuk et al. (2022) and OrthoDiffusion, the input view is noised to a few fixed
timesteps (with a fixed seed, so features are deterministic), the UNet runs once per
timestep, and the outputs of its decoder (up) blocks, caught by forward hooks, are
upsampled to the input grid and stacked. Large views go through MONAI's
``sliding_window_inference``, so memory is bounded whatever the input size; the noise is
drawn once for the whole view so neighbouring windows see the same noisy image.

Window borders show in the features: a UNet's output near a zero-padded border differs from
its output in the middle, and with 16-slice windows (10 % overlap, Gaussian blending) the
feature change between neighbouring slices is about twice its median at the seams
(``bench/feature_seams.py``). Heads learn such stripes as a position code. With
``span_slices`` each window covers the whole slice axis (a thick-slice view has 40-60 slices
at the backbone's 3 mm), so the only seams left are in plane, where the windows usually
cover the whole view anyway.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..progress import CancelToken

__all__ = ["FeatureExtractor", "FeatureCache", "feature_channels", "window_roi"]


def feature_channels(channels: Sequence[int], timesteps: Sequence[int], budget_per_block: int) -> int:
    """How many channels extract_features returns for a backbone with these block widths."""
    return len(timesteps) * sum(min(c, budget_per_block) for c in reversed(channels))


def window_roi(window_ijk: Sequence[int], view_ijk: Sequence[int], levels: int, span_slices: bool) -> tuple[int, ...]:
    """The window one view is tiled with (network layout i, j, k): the configured window, no
    larger than the view rounded up to what the UNet's ``levels`` of downsampling need, and
    over every slice when ``span_slices``."""
    multiple = 2 ** (levels - 1)
    roi = [min(r, int(np.ceil(s / multiple)) * multiple) for r, s in zip(window_ijk, view_ijk)]
    if span_slices:  # k, the slice axis, is last
        roi[2] = int(np.ceil(view_ijk[2] / multiple)) * multiple
    return tuple(roi)


class FeatureExtractor:
    """Wraps one view's frozen UNet; ``__call__(view_array) -> (C, K, J, I) float32 features``."""

    def __init__(
        self,
        unet,
        scheduler,
        timesteps: Sequence[int] = (50, 150, 250),
        budget_per_block: int = 16,
        window_ijk: Sequence[int] = (160, 160, 16),
        overlap: float = 0.1,
        seed: int = 0,
        device=None,
        sw_batch_size: int = 1,
        span_slices: bool = False,
    ) -> None:
        import torch

        bad = [c for c in unet.block_out_channels if c > budget_per_block and c % budget_per_block]
        if bad:
            raise ValueError(
                f"budget_per_block={budget_per_block} must divide the wider decoder blocks' channels {bad}"
            )
        self.unet = unet.eval()
        self.scheduler = scheduler
        self.timesteps = tuple(int(t) for t in timesteps)
        self.budget = int(budget_per_block)
        self.roi = tuple(int(r) for r in window_ijk)  # network layout (see diffusion.to_network)
        self.overlap = overlap
        self.seed = seed
        self.device = device or next(unet.parameters()).device
        self.sw_batch_size = sw_batch_size
        self.span_slices = bool(span_slices)
        self._captured: list = []
        self._hooks = [block.register_forward_hook(self._capture) for block in unet.up_blocks]
        # cancellation is checked before every block, so a cancel lands within a fraction of a second
        self._cancel: CancelToken | None = None
        blocks = [*unet.down_blocks, unet.middle_block, *unet.up_blocks]
        self._hooks += [block.register_forward_pre_hook(self._check_cancel) for block in blocks]
        for p in self.unet.parameters():
            p.requires_grad_(False)
        self.dtype = torch.float32

    def _capture(self, module, inputs, output) -> None:
        self._captured.append(output)

    def _check_cancel(self, module, inputs) -> None:
        if self._cancel is not None:
            self._cancel.raise_if_cancelled()

    def close(self) -> None:
        """Detach the hooks (the UNet can then be used on its own again)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    @property
    def channels(self) -> int:
        return feature_channels(self.unet.block_out_channels, self.timesteps, self.budget)

    def _window_features(self, window, timestep: int):
        """Run the UNet on a batch of windows; return budgeted decoder features at window size."""
        import torch
        import torch.nn.functional as F

        self._captured = []
        t = torch.full((window.shape[0],), timestep, device=window.device, dtype=torch.long)
        self.unet(window, t)
        maps = []
        for feat in self._captured:
            feat = feat.float()
            if feat.shape[1] > self.budget:  # fixed, deterministic reduction: mean over channel groups
                n, c = feat.shape[:2]
                feat = feat.view(n, self.budget, c // self.budget, *feat.shape[2:]).mean(dim=2)
            if feat.shape[2:] != window.shape[2:]:
                feat = F.interpolate(feat, size=window.shape[2:], mode="trilinear", align_corners=False)
            maps.append(feat)
        self._captured = []
        return torch.cat(maps, dim=1)

    def __call__(self, view_kji: np.ndarray, cancel: CancelToken | None = None, dtype=None) -> np.ndarray:
        """Features (C, k, j, i) of a prepared view [k, j, i] (see diffusion.prepare_view)."""
        import torch
        from monai.inferers import sliding_window_inference

        from .diffusion import from_network, to_network

        x = to_network(torch.from_numpy(np.ascontiguousarray(view_kji, dtype=np.float32))[None, None])
        x = x.contiguous().to(self.device)
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        noise = torch.randn(x.shape, generator=generator).to(self.device)
        # Windows no larger than the view (rounded up to what the UNet's downsampling needs):
        # a view just over a fixed window would otherwise be tiled twice over per axis.
        roi = window_roi(self.roi, x.shape[2:], len(self.unet.block_out_channels), self.span_slices)
        outputs = []
        self._cancel = cancel
        try:
            with torch.inference_mode():
                for t in self.timesteps:
                    if cancel:
                        cancel.raise_if_cancelled()
                    noisy = self.scheduler.add_noise(x, noise, torch.tensor([t], device=self.device))
                    feats = sliding_window_inference(
                        noisy,
                        roi,
                        self.sw_batch_size,
                        lambda w, _t=t: self._window_features(w, _t),
                        overlap=self.overlap,
                        mode="gaussian",
                        padding_mode="replicate",
                    )
                    outputs.append(from_network(feats[0]).to("cpu", dtype or torch.float32))
        finally:
            self._cancel = None
        return torch.cat(outputs, dim=0).contiguous().numpy()


def array_hash(array: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(str(array.shape).encode())
    h.update(str(array.dtype).encode())
    h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


class FeatureCache:
    """Features on disk, keyed by (bundle hash, view, input hash): recomputed only when either changes."""

    def __init__(self, folder: str | os.PathLike, bundle_hash: str) -> None:
        self.folder = Path(folder)
        self.bundle_hash = bundle_hash

    def path(self, plane: str, input_hash: str) -> Path:
        key = hashlib.sha256(f"{self.bundle_hash}:{plane}:{input_hash}".encode()).hexdigest()[:32]
        return self.folder / f"{plane}-{key}.npy"

    def get(self, plane: str, input_hash: str) -> np.ndarray | None:
        p = self.path(plane, input_hash)
        return np.load(p).astype(np.float32) if p.is_file() else None

    def put(self, plane: str, input_hash: str, features: np.ndarray) -> None:
        from ..io import atomic_path

        p = self.path(plane, input_hash)
        with atomic_path(p) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, features.astype(np.float16))  # half the disk; heads train in fp32
