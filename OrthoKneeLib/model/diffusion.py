"""One 3D denoising diffusion UNet per view, and its self-supervised pretraining.

Following OrthoDiffusion (arXiv 2602.20752): each orientation (sagittal, coronal, axial) has
its own MONAI ``DiffusionModelUNet`` trained with MONAI's ``DDPMScheduler`` to predict the
noise added to patches of that orientation's volumes, at that view's own spacing (fine in
plane, thick through plane). No labels are involved; the decoder's activations later serve
as features (features.py).
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..progress import CancelToken, ProgressFn, no_progress
from ..volumes import list_volumes, normalize_intensity, reformat, resample_to_spacing

__all__ = [
    "ViewModelConfig",
    "build_unet",
    "build_scheduler",
    "prepare_view",
    "to_network",
    "from_network",
    "PretrainConfig",
    "pretrain",
]


@dataclass
class ViewModelConfig:
    """Architecture and input spec of one view's backbone (stored in the bundle)."""

    plane: str
    spacing: tuple[float, float, float] = (1.0, 1.0, 3.0)  # mm along the view's i, j, k axes
    patch: tuple[int, int, int] = (64, 64, 16)  # training patch, voxels along i, j, k
    window: tuple[int, int, int] = (160, 160, 16)  # largest inference window (sliding), voxels along i, j, k
    # (8, 16, 32): ~93 kFLOP per voxel and timestep; (16, 32, 64) costs 4x more for a CPU budget
    # of seconds per view (bench/backbone_speed.py).
    channels: tuple[int, ...] = (8, 16, 32)
    num_res_blocks: int = 1
    norm_num_groups: int = 8
    num_train_timesteps: int = 1000

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "ViewModelConfig":
        d = dict(data)
        d.setdefault("window", d.get("patch"))
        for key in ("spacing", "patch", "window", "channels"):
            d[key] = tuple(d[key])
        return cls(**d)


def build_unet(config: ViewModelConfig):
    from monai.networks.nets import DiffusionModelUNet

    return DiffusionModelUNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        channels=tuple(config.channels),
        attention_levels=tuple(False for _ in config.channels),  # attention is costly on CPU
        num_res_blocks=config.num_res_blocks,
        norm_num_groups=config.norm_num_groups,
        # MONAI always puts self-attention in the middle block; SDPA makes it ~25 % cheaper on CPU
        use_flash_attention=True,
    )


def to_network(batch_kji):
    """[..., k, j, i] (SimpleITK order) -> [..., i, j, k], the layout the UNet runs in.

    The network is axis-agnostic, but PyTorch's CPU convolution falls back from oneDNN to a
    ~5x slower path when the *first* spatial dimension is small (<= 8), which is the thin
    through-plane axis at the deeper UNet levels. Putting that axis last keeps every level
    on the fast path (bench/backbone_speed.py). This is the only place the layout changes.
    """
    return batch_kji.transpose(-1, -3)


def from_network(batch_ijk):
    """Inverse of :func:`to_network`."""
    return batch_ijk.transpose(-1, -3)


def build_scheduler(config: ViewModelConfig):
    from monai.networks.schedulers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=config.num_train_timesteps, schedule="linear_beta")


def prepare_view(image: sitk.Image, config: ViewModelConfig) -> np.ndarray:
    """A view at the model's spacing, intensities robustly scaled to [-1, 1]; array [k, j, i].

    The volume keeps its own orientation: a sagittal model sees sagittal slices.
    """
    resampled = resample_to_spacing(image, config.spacing)
    normalized = sitk.GetArrayFromImage(normalize_intensity(resampled))
    return normalized * 2.0 - 1.0


# ------------------------------------------------------------------------------ pretraining


@dataclass
class PretrainConfig:
    steps: int = 2000
    batch_size: int = 2
    learning_rate: float = 2e-4
    weight_decay: float = 1e-4
    ema_decay: float = 0.995
    checkpoint_every: int = 100
    seed: int = 0
    reformat_other_planes: bool = True
    max_volumes: int | None = None


def _collect_volumes(
    paths: Sequence[str | os.PathLike], config: ViewModelConfig, reformat_others: bool, max_volumes: int | None
) -> tuple[list[np.ndarray], list[str]]:
    """Every volume under ``paths`` as this view sees it (other planes reformatted if asked)."""
    arrays, names = [], []
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise InputError(p, "does not exist.", "Give DICOM folders, volume files or `orthoknee synth` outputs.")
        # synth outputs, or folders of links to their cases (a training split): this view's own
        # series only (never labels; a thick series of another plane reformatted into this one
        # would teach the model blur that never occurs)
        if (p / "dataset.json").is_file() or (p / "cases").is_dir():
            files += sorted((p / "cases").glob(f"*/{config.plane}.nrrd"))
        else:
            files.append(p)
    for f in files:
        for volume in list_volumes(f):
            if "labels" in Path(volume.path).name or volume.image.GetPixelID() == sitk.sitkUInt8:
                continue  # label maps are not images
            plane = volume.plane
            image = volume.image
            if plane != config.plane:
                if not reformat_others or plane == "oblique":
                    continue
                image = reformat(image, config.plane, config.spacing[0], config.spacing[2], subsamples=3)
            arrays.append(prepare_view(image, config).astype(np.float32))
            names.append(
                f"{volume.source.label} ({plane}->{config.plane})" if plane != config.plane else volume.source.label
            )
            if max_volumes and len(arrays) >= max_volumes:
                return arrays, names
    if not arrays:
        raise InputError(None, f"no {config.plane} (or reformattable) volumes found in {', '.join(map(str, paths))}.")
    return arrays, names


def _sample_patch(volume: np.ndarray, patch_kji: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """A random [k, j, i] patch, padded with background (-1) where the volume is smaller; foreground-biased."""
    pads = [(0, max(0, p - s)) for p, s in zip(patch_kji, volume.shape)]
    if any(b for _, b in pads):
        volume = np.pad(volume, pads, constant_values=-1.0)
    for _ in range(10):
        start = [int(rng.integers(0, s - p + 1)) for s, p in zip(volume.shape, patch_kji)]
        patch = volume[tuple(slice(a, a + p) for a, p in zip(start, patch_kji))]
        if (patch > -0.8).mean() > 0.3:  # mostly tissue, not air
            break
    return patch


def _ema_update(ema, model, decay: float) -> None:
    import torch

    with torch.no_grad():
        for e, m in zip(ema.parameters(), model.parameters()):
            e.mul_(decay).add_(m.detach(), alpha=1 - decay)
        for e, m in zip(ema.buffers(), model.buffers()):
            e.copy_(m)


def _denoising_step(
    model,
    ema,
    optimizer,
    scaler,
    scheduler,
    batch: np.ndarray,
    view: ViewModelConfig,
    config: PretrainConfig,
    dev,
    use_amp: bool,
) -> float:
    """One step of the denoising objective on a batch of patches: noise at random timesteps, predict it."""
    import torch

    x = to_network(torch.from_numpy(batch[:, None])).contiguous().to(dev)
    if use_amp:
        x = x.to(memory_format=torch.channels_last_3d)
    noise = torch.randn_like(x)
    t = torch.randint(0, view.num_train_timesteps, (x.shape[0],), device=dev)
    with torch.autocast(dev.type, dtype=torch.float16, enabled=use_amp):
        noisy = scheduler.add_noise(x, noise, t)
        loss = torch.nn.functional.mse_loss(model(noisy, t).float(), noise.float())
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    _ema_update(ema, model, config.ema_decay)
    return float(loss.detach())


def pretrain(
    view: ViewModelConfig,
    data: Sequence[str | os.PathLike],
    checkpoint_path: str | os.PathLike,
    config: PretrainConfig = PretrainConfig(),
    device: str = "auto",
    resume: bool = True,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
    volumes: list[np.ndarray] | None = None,
    init_state: dict | None = None,
) -> dict:
    """Train the view's denoiser; checkpoints (model, EMA, optimizer, step, RNG) let a stopped
    run resume at the same step. Returns a summary (losses, wall time, data).

    ``init_state`` (a trained denoiser's state dict) continues an earlier pretraining instead of
    starting from random weights: the model and its EMA both start there, the optimizer afresh.
    A checkpoint of this run, when resumed, takes precedence over it.
    """
    import torch

    from ..io import atomic_path, load_checkpoint
    from .device import select_device

    dev = select_device(device)
    torch.manual_seed(config.seed)
    if volumes is None:
        volumes, names = _collect_volumes(data, view, config.reformat_other_planes, config.max_volumes)
    else:
        names = [f"array {i}" for i in range(len(volumes))]
    model = build_unet(view).to(dev)
    scheduler = build_scheduler(view)
    ema = copy.deepcopy(model).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    use_amp = dev.type == "cuda"
    if use_amp:
        model = model.to(memory_format=torch.channels_last_3d)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    step, losses, elapsed_before = 0, [], 0.0
    checkpoint_path = Path(checkpoint_path)
    if init_state is not None:
        model.load_state_dict(init_state)
        ema.load_state_dict(init_state)
    if resume and checkpoint_path.is_file():
        state = load_checkpoint(checkpoint_path, dev)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        step, losses, elapsed_before = state["step"], state["losses"], state.get("elapsed", 0.0)
        torch.set_rng_state(state["torch_rng"])
    patch_kji = tuple(view.patch[::-1])

    def save() -> None:
        with atomic_path(checkpoint_path) as tmp:
            torch.save(
                {
                    "model": model.state_dict(),
                    "ema": ema.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "step": step,
                    "losses": losses,
                    "elapsed": elapsed_before + time.perf_counter() - start,
                    "torch_rng": torch.get_rng_state(),
                    "view": view.to_json(),
                    "config": asdict(config),
                    "data": names,
                },
                tmp,
            )

    start = time.perf_counter()
    model.train()
    while step < config.steps:
        if cancel and cancel.cancelled:
            save()
            cancel.raise_if_cancelled()
        # patches drawn from a per-step generator: a resumed run sees what an uninterrupted one would
        rng = np.random.default_rng([config.seed, step])
        batch = np.stack(
            [_sample_patch(volumes[rng.integers(len(volumes))], patch_kji, rng) for _ in range(config.batch_size)]
        )
        losses.append(_denoising_step(model, ema, optimizer, scaler, scheduler, batch, view, config, dev, use_amp))
        step += 1
        progress(step, config.steps, f"loss {np.mean(losses[-20:]):.4f}")
        if step % config.checkpoint_every == 0 or step == config.steps:
            save()
    return {
        "plane": view.plane,
        "steps": step,
        "final_loss": float(np.mean(losses[-50:])) if losses else None,
        "first_loss": float(np.mean(losses[:50])) if losses else None,
        "seconds": elapsed_before + time.perf_counter() - start,
        "device": str(dev),
        "volumes": len(volumes),
        "data": names,
        "ema": ema,
        "losses": losses,
    }
