"""View fusion, segmentation head and finding head: everything trained on frozen features.

Each view's decoder features live on that view's own grid (its orientation, the backbone's
spacing). Fusion brings them, in physical space, onto the *fusion grid*: the reference view
at the backbone spacing (1 x 1 x 3 mm in its own orientation). There a learned per-view,
per-channel weighting combines whatever views are present and cover a voxel, so a case with
one or two views runs with the same weights. The segmentation head predicts coarse logits on
the fusion grid and refines them on the reference series' own (finer) grid with the image,
so thin cartilage plates are drawn at the resolution the reader sees. The finding head works
on a pooled fusion grid (3 x 3 x 3 mm cells): per-cell logits for each finding, pooled into a
case-level score by gated attention (Ilse et al. 2018); the attention-weighted per-cell map is
the overlay, so the score and the map come from the same numbers.

Arrays follow SimpleITK's [k, j, i] order (torch's D, H, W), channels first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "Grid",
    "grid_of",
    "resample_to_grid",
    "pooled_grid",
    "pooled",
    "HeadsConfig",
    "ViewFusion",
    "SegmentationHead",
    "FindingHead",
    "OrthoKneeHeads",
    "marginal_seg_loss",
]

VIEW_ORDER = ("sagittal", "coronal", "axial")


# --------------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Grid:
    """A voxel grid in LPS: what SimpleITK's image geometry says, without the pixels."""

    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    direction: tuple[float, ...]
    size: tuple[int, int, int]  # i, j, k

    def index_to_physical(self) -> np.ndarray:
        """4x4 matrix mapping (i, j, k, 1) to LPS millimetres."""
        m = np.eye(4)
        m[:3, :3] = np.asarray(self.direction, float).reshape(3, 3) @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def image(self, array_kji: np.ndarray | None = None, dtype=np.uint8) -> sitk.Image:
        """An image on this grid holding ``array_kji`` (zeros if None)."""
        if array_kji is None:
            array_kji = np.zeros(self.size[::-1], dtype)
        image = sitk.GetImageFromArray(array_kji)
        image.SetOrigin(self.origin)
        image.SetSpacing(self.spacing)
        image.SetDirection(self.direction)
        return image

    def to_json(self) -> dict:
        return asdict(self)


def grid_of(image: sitk.Image) -> Grid:
    return Grid(
        tuple(image.GetOrigin()), tuple(image.GetSpacing()), tuple(image.GetDirection()), tuple(image.GetSize())
    )


def pooled_grid(grid: Grid, factor_ijk: Sequence[int]) -> Grid:
    """The grid ``F.avg_pool3d(kernel=stride=factor, ceil_mode=True)`` produces from ``grid``."""
    factor = np.asarray(factor_ijk, float)
    spacing = np.asarray(grid.spacing) * factor
    d = np.asarray(grid.direction).reshape(3, 3)
    # the first cell's centre is the mean of the first `factor` voxel centres
    origin = np.asarray(grid.origin) + d @ (np.asarray(grid.spacing) * (factor - 1) / 2)
    size = tuple(int(np.ceil(s / f)) for s, f in zip(grid.size, factor_ijk))
    return Grid(tuple(origin), tuple(spacing), grid.direction, size)


def pooled(array, factor_kji: Sequence[int]) -> torch.Tensor:
    """Average pooling with ``ceil_mode`` (cells at the border average what they hold): the values
    on :func:`pooled_grid`."""
    t = torch.as_tensor(array, dtype=torch.float32)
    return F.avg_pool3d(t[None], factor_kji, factor_kji, ceil_mode=True, count_include_pad=False)[0]


def _sampling_grid(src: Grid, dst: Grid, device=None) -> torch.Tensor:
    """For every voxel of ``dst``, where it falls in ``src``, in grid_sample's [-1, 1] units."""
    m = np.linalg.inv(src.index_to_physical()) @ dst.index_to_physical()  # dst (i,j,k,1) -> src (i,j,k,1)
    size_src = np.asarray(src.size, float)
    # normalized = 2 * idx / (n - 1) - 1  (align_corners=True), folded into the affine
    scale = np.where(size_src > 1, 2.0 / np.maximum(size_src - 1, 1), 0.0)
    norm = np.diag(np.r_[scale, 1.0])
    norm[:3, 3] = np.where(size_src > 1, -1.0, 0.0)
    m = torch.as_tensor(norm @ m, dtype=torch.float32, device=device)
    i, j, k = dst.size
    kk, jj, ii = torch.meshgrid(
        torch.arange(k, dtype=torch.float32, device=device),
        torch.arange(j, dtype=torch.float32, device=device),
        torch.arange(i, dtype=torch.float32, device=device),
        indexing="ij",
    )
    points = torch.stack([ii, jj, kk], dim=-1)  # (k, j, i, 3) as (x=i, y=j, z=k), grid_sample's order
    return points @ m[:3, :3].T + m[:3, 3]


def resample_to_grid(
    values: torch.Tensor, src: Grid, dst: Grid, mode: str = "bilinear", chunk_slices: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample (C, k, j, i) ``values`` from ``src`` onto ``dst`` in physical space.

    Returns the resampled values and the coverage (1, k, j, i): the fraction of the voxel's
    interpolation support that lies inside the source (0 outside its field of view), used
    as the fusion weight so a view never votes where it saw nothing. Works a few slices at
    a time to keep the sampling coordinates small.
    """
    out, cover = [], []
    # channels-last makes CPU grid_sample ~5x faster for many channels (bench/predict_speed.py)
    source = values[None].contiguous(memory_format=torch.channels_last_3d)
    ones = torch.ones((1, 1, *values.shape[1:]), dtype=values.dtype, device=values.device)
    k = dst.size[2]
    for k0 in range(0, k, chunk_slices):
        sub = Grid(
            tuple(
                np.asarray(dst.origin)
                + np.asarray(dst.direction).reshape(3, 3) @ (np.asarray(dst.spacing) * np.array([0, 0, k0]))
            ),
            dst.spacing,
            dst.direction,
            (dst.size[0], dst.size[1], min(chunk_slices, k - k0)),
        )
        g = _sampling_grid(src, sub, values.device)[None].to(values.dtype)
        out.append(F.grid_sample(source, g, mode=mode, padding_mode="zeros", align_corners=True)[0])
        cover.append(F.grid_sample(ones, g, mode="bilinear", padding_mode="zeros", align_corners=True)[0])
    return torch.cat(out, dim=1).contiguous(), torch.cat(cover, dim=1).contiguous()


# ------------------------------------------------------------------------------------ heads


@dataclass
class HeadsConfig:
    """Sizes of the heads (stored in the bundle with their weights)."""

    view_channels: dict[str, int] = field(default_factory=dict)  # plane -> feature channels
    n_classes: int = 12  # background + 11 structures
    n_findings: int = 8
    fused_channels: int = 24
    seg_widths: tuple[int, ...] = (32, 48, 64)  # per level of the segmentation U: 1, 2, 4 mm in plane
    refine_hidden: int = 16
    finding_hidden: int = 32
    attention_hidden: int = 8
    finding_pool: tuple[int, int, int] = (3, 3, 1)  # i, j, k cells of the fusion grid
    context_dilations: tuple[int, ...] = (1, 2, 4, 8)  # at the coarsest level: ~130 mm in-plane receptive field
    attention_reads_logits: bool = True  # see FindingHead; bundles written before it existed: False
    fusion: str = "per-view"  # "per-view" weights, or "per-voxel" weights read from each view's features
    finding_hosts: bool = False  # attention reads each finding's host anatomy only (see FindingHead)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "HeadsConfig":
        d = dict(data)
        for key in ("finding_pool", "context_dilations", "seg_widths"):
            if key in d:
                d[key] = tuple(d[key])
        d.setdefault("attention_reads_logits", False)  # heads trained before the field existed
        d.setdefault("fusion", "per-view")
        d.setdefault("finding_hosts", False)  # heads trained before the field existed
        if d["fusion"] not in FUSION_KINDS:
            raise ValueError(f"heads config has fusion {d['fusion']!r}; this version knows {', '.join(FUSION_KINDS)}")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"heads config has unknown fields {sorted(unknown)}: the bundle was written by another "
                "version of OrthoKnee"
            )
        return cls(**d)


FUSION_KINDS = ("per-view", "per-voxel")


class ViewFusion(nn.Module):
    """Per-view 1x1x1 projections, averaged with weights over the views present.

    ``per-view``: the weight of a view at a voxel is exp(logit[view, channel]) x coverage(view,
    voxel). Where all views cover a voxel, a constant weight per view does nothing a scaled
    projection cannot (docs/experiments.md, "Three views on seam-free features"), so
    ``per-voxel`` adds a score read from the view's own features at that voxel (a 1x1x1
    projection): a view can weigh more where it resolves the anatomy (in its plane) and less
    where it is blurred (through its thick slices). Either way the weights are normalized over
    the views present, so an absent view, or a voxel outside a view's field of view, drops out
    of the average, and a single view's features pass through its projection unchanged.
    """

    def __init__(self, view_channels: dict[str, int], out_channels: int, per_voxel: bool = False) -> None:
        super().__init__()
        self.planes = tuple(p for p in VIEW_ORDER if p in view_channels)
        self.project = nn.ModuleDict({p: Pointwise(view_channels[p], out_channels) for p in self.planes})
        self.view_logits = nn.Parameter(torch.zeros(len(self.planes), out_channels))
        self.per_voxel = per_voxel
        if per_voxel:
            self.score = nn.ModuleDict({p: Pointwise(view_channels[p], out_channels) for p in self.planes})

    def reset_scores(self) -> None:
        """Scores of zero: each view's weight starts as its per-view logit alone."""
        if self.per_voxel:
            for module in self.score.values():
                nn.init.zeros_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, features: dict[str, torch.Tensor], coverage: dict[str, torch.Tensor]) -> torch.Tensor:
        present = [(n, p) for n, p in enumerate(self.planes) if p in features]
        if not present:
            raise ValueError(f"no view among {self.planes} was given")
        if not self.per_voxel:
            num = den = None
            for n, plane in present:
                w = torch.exp(self.view_logits[n]).view(1, -1, 1, 1, 1) * coverage[plane]
                term = w * self.project[plane](features[plane])
                num = term if num is None else num + term
                den = w if den is None else den + w
            return num / den.clamp_min(1e-4)
        logits = [self.view_logits[n].view(1, -1, 1, 1, 1) + self.score[plane](features[plane]) for n, plane in present]
        top = torch.stack(logits).amax(dim=0).detach()  # keeps exp() finite; cancels in the ratio
        num = den = None
        for (_, plane), logit in zip(present, logits):
            w = torch.exp(logit - top) * coverage[plane]
            term = w * self.project[plane](features[plane])
            num = term if num is None else num + term
            den = w if den is None else den + w
        return num / den.clamp_min(1e-6)


class Pointwise(nn.Module):
    """A 1x1x1 convolution as one matrix product.

    PyTorch's CPU Conv3d sends 1x1x1 kernels to its slow reference path (``slow_conv3d``);
    a GEMM over (C, voxels) is several times faster, forward and backward.
    """

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, cin))
        self.bias = nn.Parameter(torch.zeros(cout))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        bound = 1 / cin**0.5
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        flat = x.reshape(n, c, -1)
        y = torch.stack([torch.addmm(self.bias[:, None], self.weight, flat[b]) for b in range(n)])
        return y.view(n, -1, *x.shape[2:])


def _per_slice(x: torch.Tensor, op) -> torch.Tensor:
    """Apply a 2D operation to every slice of (N, C, k, j, i): slices become the batch."""
    n, c, k, j, i = x.shape
    y = op(x.transpose(1, 2).reshape(n * k, c, j, i))
    return y.view(n, k, *y.shape[1:]).transpose(1, 2)


class InPlaneConv(nn.Module):
    """A 3x3 convolution within each slice, run as Conv2d over slices (oneDNN's fast path;
    a (1, 3, 3) Conv3d takes PyTorch's slow reference path on the CPU)."""

    def __init__(self, cin: int, cout: int, dilation: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _per_slice(x, self.conv)


class ThroughPlaneConv(nn.Module):
    """A 3-tap convolution across slices, run as a (3, 1) Conv2d over (slices, in-plane voxels):
    the oneDNN fast path again, where a (3, 1, 1) Conv3d would take the slow one."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, (3, 1), padding=(1, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, k, j, i = x.shape
        return self.conv(x.reshape(n, c, k, j * i)).view(n, -1, k, j, i)


def _act() -> nn.Module:
    return nn.LeakyReLU(0.1)


def _pool_inplane(x: torch.Tensor) -> torch.Tensor:
    return _per_slice(x, lambda s: F.avg_pool2d(s, 2, ceil_mode=True))


def _upsample_inplane(x: torch.Tensor, size_ji: tuple[int, int]) -> torch.Tensor:
    return _per_slice(x, lambda s: F.interpolate(s, size=size_ji, mode="bilinear", align_corners=False))


def _context(cin: int, hidden: int, dilations: Sequence[int]) -> nn.Sequential:
    """Pointwise projection, then dilated in-plane 3x3 convolutions with a through-plane tap after
    each pair (in-plane receptive field 1 + 2 * sum(dilations) voxels)."""
    layers: list[nn.Module] = [Pointwise(cin, hidden), _act()]
    for n, d in enumerate(dilations):
        layers += [InPlaneConv(hidden, hidden, d), _act()]
        if n % 2 == 1:
            layers += [ThroughPlaneConv(hidden, hidden), _act()]
    return nn.Sequential(*layers)


class ContextUNet(nn.Module):
    """A small U on the fusion grid: in-plane pooling twice (1 -> 2 -> 4 mm), dilated context at
    the coarsest level, skips back up.

    Bone marrow, air and muscle overlap in intensity across contrasts and a small backbone's
    features do not separate them voxel by voxel: what tells the inside of a femur from air is
    the outline 3-6 cm away. A stack of dilated convolutions at 1 mm reached 31 mm and plateaued
    at a femur Dice of 0.25; this U sees ~13 cm in plane. No normalization layers, on purpose:
    the heads train on patches and run on whole volumes, where per-sample statistics differ.
    """

    def __init__(self, cin: int, cout: int, widths: Sequence[int], dilations: Sequence[int]) -> None:
        super().__init__()
        w0, w1, w2 = widths
        self.enc0 = nn.Sequential(Pointwise(cin, w0), _act(), InPlaneConv(w0, w0), _act())
        self.enc1 = nn.Sequential(
            InPlaneConv(w0, w1), _act(), InPlaneConv(w1, w1), _act(), ThroughPlaneConv(w1, w1), _act()
        )
        self.enc2 = _context(w1, w2, dilations)
        self.dec1 = nn.Sequential(Pointwise(w2 + w1, w1), _act(), InPlaneConv(w1, w1), _act())
        self.dec0 = nn.Sequential(Pointwise(w1 + w0, w0), _act(), InPlaneConv(w0, w0), _act(), Pointwise(w0, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.enc0(x)
        x1 = self.enc1(_pool_inplane(x0))
        x2 = self.enc2(_pool_inplane(x1))
        y1 = self.dec1(torch.cat([_upsample_inplane(x2, x1.shape[-2:]), x1], dim=1))
        return self.dec0(torch.cat([_upsample_inplane(y1, x0.shape[-2:]), x0], dim=1))


def _inplane_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(InPlaneConv(cin, cout), _act())


class SegmentationHead(nn.Module):
    """Coarse logits on the fusion grid from fused features + image; refined on the reference grid."""

    def __init__(self, config: HeadsConfig) -> None:
        super().__init__()
        c = config
        self.fusion = ViewFusion(c.view_channels, c.fused_channels, per_voxel=c.fusion == "per-voxel")
        self.coarse = ContextUNet(c.fused_channels + 1, c.n_classes, c.seg_widths, c.context_dilations)
        self.refine = nn.Sequential(  # in-plane only: the reference series is thick-sliced
            _inplane_block(c.n_classes + 1, c.refine_hidden),
            _inplane_block(c.refine_hidden, c.refine_hidden),
            InPlaneConv(c.refine_hidden, c.n_classes),
        )

    def coarse_logits(self, features, coverage, image_fusion: torch.Tensor) -> torch.Tensor:
        fused = self.fusion(features, coverage)
        return self.coarse(torch.cat([fused, image_fusion], dim=1))

    def refined_logits(self, coarse_on_reference: torch.Tensor, image_reference: torch.Tensor) -> torch.Tensor:
        """``coarse_on_reference``: coarse logits already resampled onto the reference grid."""
        return coarse_on_reference + self.refine(torch.cat([coarse_on_reference, image_reference], dim=1))


# A cell is a finding's host where the segmentation gives its host structures at least this
# probability (in between, the cell counts in proportion: a cell half host or more counts whole).
HOST_MIN = 0.05


def host_weight(hosts: torch.Tensor) -> torch.Tensor:
    """How much each cell counts for its finding's attention and map, in [0, 1], from the host
    probability on the cell: 0 below :data:`HOST_MIN`, whole from 0.5 up, linear in between (a
    bone edge, a thin ligament)."""
    return (2 * hosts).clamp(0, 1) * (hosts >= HOST_MIN)


class FindingHead(nn.Module):
    """Per-cell finding logits and gated-attention pooling (one attention map per finding)."""

    def __init__(self, config: HeadsConfig) -> None:
        super().__init__()
        c = config
        self.n = c.n_findings
        self.fusion = ViewFusion(c.view_channels, c.fused_channels, per_voxel=c.fusion == "per-voxel")
        self.trunk = _context(c.fused_channels + 1, c.finding_hidden, (1, 2, 4, 8))  # 3-mm cells: ~9 cm
        self.cell_logits = Pointwise(c.finding_hidden, c.n_findings)
        a = c.attention_hidden
        self.attention_v = Pointwise(c.finding_hidden, c.n_findings * a)
        self.attention_u = Pointwise(c.finding_hidden, c.n_findings * a)
        # one attention vector per finding (Ilse et al.'s w), applied to that finding's gate
        self.attention_w = nn.Parameter(torch.randn(c.n_findings, a) / a**0.5)
        # Attention starts from the cells' own logits (a soft maximum over the cells) and the
        # gate learns what to add. With ~50 training cases the gate alone did not learn where
        # lesions are: attention held < 0.1 % of its weight on the lesion cells, so the overlay
        # (probability x relative attention) hid the lesions the cells had found.
        self.attention_reads_logits = c.attention_reads_logits
        if c.finding_hosts:
            # Read from the host alone, the attention-weighted cell logits are a score on the
            # cells' scale: a host's lesion-free cells are trained low, so the pooled logit of a
            # case sits below its finding's prevalence. One scale and offset per finding, learnt by
            # the case loss, put it back on the probability scale (Platt scaling inside the head).
            self.case_scale = nn.Parameter(torch.ones(c.n_findings))
            self.case_bias = nn.Parameter(torch.zeros(c.n_findings))

    def forward(
        self, features, coverage, image_pooled: torch.Tensor, inside: torch.Tensor, hosts: torch.Tensor | None = None
    ):
        """Returns (case logits (N, F), cell logits (N, F, k, j, i), attention (N, F, k, j, i)).

        ``inside`` (N, 1, k, j, i) is 1 where any view saw the cell: attention is a softmax over
        those cells only. ``hosts`` (N, F, k, j, i) in [0, 1], when given, is each finding's host
        anatomy on the cells (:func:`OrthoKneeLib.gating.finding_hosts`): attention is a softmax
        over the host's cells, each weighted by :func:`host_weight`, so a case score is read from
        the finding's own anatomy (without it, a bone marrow lesion's score could be read off an
        effusion). A finding whose host the segmentation did not find anywhere reads every cell:
        a ligament it failed to outline still has a score.
        """
        h = self.trunk(torch.cat([self.fusion(features, coverage), image_pooled], dim=1))
        logits = self.cell_logits(h)
        # The case-level loss trains the attention only: it reaches neither the cell logits nor
        # the trunk (detached below; the forward values are unchanged). When it flowed into
        # them, a negative case pushed down whatever cells attention looked at, and the trunk
        # learnt to rank lesion cells *below* the background: on held-out cases the cell AUC of
        # lesion cells was 0.07-0.16 for every finding but bone marrow lesions (0.86-0.99 once
        # detached; the model card's "Finding head" table). So the cells learn where each
        # finding is, from the lesion masks; attention learns which cells the case score reads.
        h_attention = h.detach()
        gate = torch.tanh(self.attention_v(h_attention)) * torch.sigmoid(self.attention_u(h_attention))
        n = gate.shape[0]
        gate = gate.view(n, self.n, -1, *gate.shape[2:])
        scores = torch.einsum("nfa...,fa->nf...", gate, self.attention_w)
        if self.attention_reads_logits:
            scores = scores + logits.detach()
        allowed = (inside >= 0.5).expand_as(scores)
        if hosts is not None:
            weight = host_weight(hosts)
            on_host = allowed & (weight > 0)
            found = on_host.flatten(2).any(-1)[..., None, None, None]  # (N, F, 1, 1, 1)
            scores = torch.where(found, scores + torch.log(weight.clamp_min(1e-12)), scores)
            allowed = torch.where(found, on_host, allowed)
        scores = scores.masked_fill(~allowed, float("-inf"))
        attention = torch.softmax(scores.flatten(2), dim=-1).view_as(scores)
        case_logits = (attention * logits.detach()).flatten(2).sum(-1)
        if hasattr(self, "case_scale"):
            case_logits = self.case_scale * case_logits + self.case_bias
        return case_logits, logits, attention

    @staticmethod
    def seen_cells(coverage: dict[str, torch.Tensor]) -> torch.Tensor:
        """``inside`` for forward: 1 where the fused views together cover over 5 % of a cell.

        Training (pooled from the cache) and prediction (pooled on the fly) must draw the same
        line: attention and the cell loss ignore the cells outside it.
        """
        return (sum(coverage.values()) > 0.05).float()

    @staticmethod
    def overlay(logits: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """Per-cell probability weighted by attention relative to the most attended cell, in [0, 1]."""
        peak = attention.flatten(2).amax(-1).clamp_min(1e-12)[..., None, None, None]
        return torch.sigmoid(logits) * (attention / peak)

    def map_cells(self, logits: torch.Tensor, attention: torch.Tensor, hosts: torch.Tensor | None) -> torch.Tensor:
        """The finding map on the cells, in [0, 1].

        Heads that read host anatomy show each cell's logit on the case score's scale, on its
        host: sigmoid(scale x logit + offset) on every cell the attention may read (where
        :func:`host_weight` is above 0), 0 elsewhere. The case logit is an attention-weighted mean
        of those same cell values, so a case scored p has a host cell at p or above (a high score
        always shows where) and a map low everywhere cannot score high. (Partial host cells are
        shown whole: the voxel map is confined to the host, widened 2 mm, for display.)
        Other heads: :meth:`overlay`.
        """
        if hosts is None or not hasattr(self, "case_scale"):
            return self.overlay(logits, attention)
        scale, bias = self.case_scale[None, :, None, None, None], self.case_bias[None, :, None, None, None]
        readable = host_weight(hosts) > 0
        found = readable.flatten(2).any(-1)[..., None, None, None]
        return torch.sigmoid(scale * logits + bias) * (readable | ~found)


def _init_weights(module: nn.Module) -> None:
    """He initialization for LeakyReLU on every convolution.

    Without normalization layers, PyTorch's default initialization (uniform, gain 1/sqrt(3))
    shrinks the signal about threefold per layer: through the U the spatial variation of the
    logits at initialization was 0.007 of the input's, so training first learnt the biases and
    the patch borders (position) and only slowly the image. He initialization keeps it ~1.
    """
    for m in module.modules():
        weight = getattr(m, "weight", None)
        if isinstance(m, (nn.Conv2d, Pointwise)) and weight is not None:
            nn.init.kaiming_normal_(weight, a=0.1, mode="fan_in", nonlinearity="leaky_relu")
            nn.init.zeros_(m.bias)


class OrthoKneeHeads(nn.Module):
    def __init__(self, config: HeadsConfig) -> None:
        super().__init__()
        self.config = config
        self.segmentation = SegmentationHead(config)
        self.findings = FindingHead(config)
        _init_weights(self)
        for head in (self.segmentation, self.findings):
            head.fusion.reset_scores()


def marginal_seg_loss(
    logits: torch.Tensor, labels: torch.Tensor, annotated: torch.Tensor, dice_weight: float = 1.0
) -> torch.Tensor:
    """Dice + cross-entropy over the classes a case annotates only.

    ``annotated`` (N, n_classes) bool, background always True. The classes a case does not
    annotate are removed from its softmax (their logits masked): such a case teaches nothing
    about them, and nothing can be gained by predicting them. (Merging them into background
    instead, the marginal loss of Shi et al. 2021, let the heads put every background voxel
    of a bones-and-cartilage-only case into an unannotated class at no cost, and training
    collapsed to that.) Dice is averaged over annotated foreground classes present in the batch.
    """
    n, c = logits.shape[:2]
    masked = logits.float().masked_fill(~annotated.view(n, c, 1, 1, 1), -1e4)
    ce = F.cross_entropy(masked, labels.long())
    probs = torch.softmax(masked, dim=1)
    onehot = F.one_hot(labels.long(), c).permute(0, 4, 1, 2, 3).float()
    dims = (2, 3, 4)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + 1e-3) / (denom + 1e-3)
    use = annotated.clone()
    use[:, 0] = False
    use = use & (onehot.sum(dims) > 0)
    dice_loss = (1 - dice)[use].mean() if use.any() else logits.sum() * 0
    return ce + dice_weight * dice_loss


def build_baseline(n_classes: int = 12):
    """The supervised comparison: a MONAI UNet trained end to end on the reference series.

    Anisotropic strides (in-plane first) because the reference series is thick-sliced. Three
    downsamplings and 160-voxel patches (~10 cm at 0.6 mm) give it the in-plane context the
    heads' U has; with two levels and 96-voxel patches it could not tell marrow from air.
    """
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=n_classes,
        channels=(16, 32, 64, 128),
        strides=((1, 2, 2), (1, 2, 2), (2, 2, 2)),
        num_res_units=1,
    )


BASELINE_PATCH_KJI = (8, 160, 160)


def grow_segmentation_classes(model: "OrthoKneeHeads", extra: int) -> "OrthoKneeHeads":
    """The same heads with ``extra`` more segmentation classes: every old weight kept (the old classes'
    logits are unchanged until training moves them), the new classes' output rows start at zero
    with a low bias so that they claim no voxel before they are trained.

    Only three tensors depend on the number of classes: the coarse U's last layer (out), the
    refinement's first layer (in: the classes' logits, then the image) and its last layer (out).
    """
    from dataclasses import replace

    old = model.config
    n = old.n_classes
    grown = OrthoKneeHeads(replace(old, n_classes=n + extra))
    state, new_state = model.state_dict(), grown.state_dict()
    for key, value in state.items():
        target = new_state[key]
        if target.shape == value.shape:
            new_state[key] = value.clone()
        elif key.startswith("segmentation.refine.0.") and key.endswith("weight"):  # in: n classes + image
            t = torch.zeros_like(target)
            t[:, :n] = value[:, :n]
            t[:, n + extra :] = value[:, n:]
            new_state[key] = t
        elif key.endswith("weight"):  # out rows: old classes first, new ones zero
            t = torch.zeros_like(target)
            t[:n] = value
            new_state[key] = t
        else:  # out bias: new classes start unlikely
            t = torch.full_like(target, -4.0)
            t[:n] = value
            new_state[key] = t
    grown.load_state_dict(new_state)
    return grown


def add_views(model: "OrthoKneeHeads", view_channels: dict[str, int], start_logit: float = -4.0) -> "OrthoKneeHeads":
    """The same heads fusing more views, per voxel: every old weight kept.

    The new views' projections start from He initialization and their weights from
    ``start_logit`` (exp(-4) = 0.018 of an old view's), so the grown heads begin close to the
    old ones where the old views are present and exactly as them when only old views are given:
    training then teaches where a new view helps. With ``--train-heads fusion`` nothing else
    moves, so predictions from the old views alone stay exactly what they were.
    """
    from dataclasses import replace

    old = model.config
    missing = [p for p in old.view_channels if p not in view_channels]
    if missing:
        raise ValueError(f"add_views keeps every view the heads have; {missing} are not in {sorted(view_channels)}")
    grown = OrthoKneeHeads(replace(old, view_channels=dict(view_channels), fusion="per-voxel"))
    state, new_state = model.state_dict(), grown.state_dict()
    for key, value in state.items():
        if key.endswith("fusion.view_logits"):
            head = key.split(".")[0]
            new_planes = getattr(grown, head).fusion.planes
            old_planes = getattr(model, head).fusion.planes
            t = torch.full_like(new_state[key], start_logit)
            for n, plane in enumerate(old_planes):
                t[new_planes.index(plane)] = value[n]
            new_state[key] = t
        else:
            new_state[key] = value.clone()
    grown.load_state_dict(new_state)
    return grown


def read_hosts(model: "OrthoKneeHeads") -> "OrthoKneeHeads":
    """The same heads with their finding attention reading host anatomy (``finding_hosts``):
    every weight kept, the case scores' scale and offset starting at 1 and 0."""
    from dataclasses import replace

    if model.config.finding_hosts:
        return model
    grown = OrthoKneeHeads(replace(model.config, finding_hosts=True))
    missing, unexpected = grown.load_state_dict(model.state_dict(), strict=False)
    assert set(missing) == {"findings.case_scale", "findings.case_bias"} and not unexpected, (missing, unexpected)
    return grown


def grow_findings(model: "OrthoKneeHeads", extra: int) -> "OrthoKneeHeads":
    """The same heads with ``extra`` more findings: every old weight kept, so the old findings'
    scores are unchanged until training moves them. The new findings' cell logits start at zero
    weight and a low bias (p ~ 0.02 before training); their attention starts from the fresh
    initialization (attention reads each finding's own cell logits first, see FindingHead).

    Three tensors depend on the number of findings: the cell logits' rows, the attention gates'
    rows (one block of ``attention_hidden`` rows per finding) and the attention vectors.
    """
    from dataclasses import replace

    old = model.config
    n = old.n_findings
    grown = OrthoKneeHeads(replace(old, n_findings=n + extra))
    state, new_state = model.state_dict(), grown.state_dict()
    rows = {
        "findings.cell_logits.": 1,
        "findings.attention_v.": old.attention_hidden,
        "findings.attention_u.": old.attention_hidden,
    }
    for key, value in state.items():
        target = new_state[key]
        if target.shape == value.shape:
            new_state[key] = value.clone()
            continue
        t = target.clone()
        prefix = next((p for p in rows if key.startswith(p)), None)
        kept = n * rows[prefix] if prefix else n
        t[:kept] = value
        if key == "findings.cell_logits.weight":
            t[kept:] = 0.0
        elif key == "findings.cell_logits.bias":
            t[kept:] = -4.0
        new_state[key] = t
    grown.load_state_dict(new_state)
    return grown
