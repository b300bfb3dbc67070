"""The ``augment`` options applied to a whole batch at once, on whatever device the batch is on.

Each image gets its own random affine (rotation, whole-pixel shift, zoom, x-shear) and flips, drawn from the same
distributions as :func:`cellcls.data.transforms.build_augment`'s per-image torchvision transforms, and resampled
with the same geometry (torchvision's inverse affine matrix, pixel-centre grid, bilinear, constant fill with its
mask blending). Flips are folded into the sampling grid, so one ``grid_sample`` call does the lot. ``augment.policy``
(RandAugment/TrivialAugment) follows image by image: torchvision has no batched form of them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from cellcls.data.transforms import Augment, parse_augment


@dataclass
class AffineParams:
    """Per-image parameters, each a length-N float tensor (flips are +1 or -1)."""

    angle: torch.Tensor
    tx: torch.Tensor
    ty: torch.Tensor
    scale: torch.Tensor
    shear: torch.Tensor
    flip_x: torch.Tensor
    flip_y: torch.Tensor


class BatchAugment:
    """Random augmentation of float ``N x C x H x W`` batches with values in [0, 1]."""

    def __init__(self, cfg: Mapping[str, Any] | Augment) -> None:
        self.settings = cfg if isinstance(cfg, Augment) else parse_augment(cfg)
        fill = self.settings.fill_values
        # the batch is float in [0, 1] here, so the 0-255 fill is scaled
        self.policy = self.settings.policy_transform([f / 255 for f in fill] if len(fill) > 1 else fill[0] / 255)

    def sample(self, n: int, height: int, width: int, generator: torch.Generator | None = None) -> AffineParams:
        """Draw parameters on the CPU (seeded like the per-image path: torch's global generator by default)."""
        a = self.settings

        def uniform(lo: float, hi: float) -> torch.Tensor:
            return torch.rand(n, generator=generator, dtype=torch.float64) * (hi - lo) + lo

        zeros, ones = torch.zeros(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
        # torchvision rounds the shift to whole pixels (int(round(u))); round-half-even as Python's round does
        tx = torch.round(uniform(-a.shift * width, a.shift * width)) if a.shift else zeros
        ty = torch.round(uniform(-a.shift * height, a.shift * height)) if a.shift else zeros

        def flips(enabled: bool) -> torch.Tensor:
            return torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0).double() if enabled else ones

        return AffineParams(
            angle=uniform(-a.rotation, a.rotation) if a.rotation else zeros,
            tx=tx,
            ty=ty,
            scale=uniform(1 - a.zoom, 1 + a.zoom) if a.zoom else ones,
            shear=uniform(-a.shear_degrees, a.shear_degrees) if a.shear else zeros,
            flip_x=flips(a.hflip),
            flip_y=flips(a.vflip),
        )

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        a = self.settings
        if a.affine or a.hflip or a.vflip:
            n, _, h, w = images.shape
            images = self.apply(images, self.sample(n, h, w, generator))
        if self.policy is not None:
            # torchvision has no batched RandAugment/TrivialAugment: image by image, as on the loader path (the ops
            # draw from torch's global generator, which the trainer seeds per epoch)
            images = torch.stack([self.policy(image) for image in images])
        return images

    def apply(self, images: torch.Tensor, p: AffineParams) -> torch.Tensor:
        """``images`` transformed with the given parameters (deterministic; for tests and replays)."""
        a = self.settings
        if not a.affine:  # flips only: exact, no resampling
            out = images
            if a.hflip:
                out = torch.where((p.flip_x < 0).to(images.device).view(-1, 1, 1, 1), out.flip(-1), out)
            if a.vflip:
                out = torch.where((p.flip_y < 0).to(images.device).view(-1, 1, 1, 1), out.flip(-2), out)
            return out
        h, w = images.shape[-2:]
        theta = inverse_affine(p).to(device=images.device, dtype=images.dtype)
        # flipping the output is flipping the grid's x (y) coordinates: scale the matrix's first (second) column
        theta[:, :, 0] *= p.flip_x.to(theta)[:, None]
        theta[:, :, 1] *= p.flip_y.to(theta)[:, None]
        grid = pixel_grid(theta, h, w)
        out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        mask = coverage(grid, h, w).unsqueeze(1)
        # torchvision's blend: mask * (img - fill) + fill, which is img * mask for a black fill
        if not any(a.fill_values):
            return out.mul_(mask)
        fill = torch.tensor(a.fill_values, dtype=images.dtype, device=images.device).div_(255.0)
        fill = fill.view(1, -1, 1, 1) if fill.numel() > 1 else fill.view(1, 1, 1, 1)
        return out.sub_(fill).mul_(mask).add_(fill)


def inverse_affine(p: AffineParams) -> torch.Tensor:
    """``N x 2 x 3`` output-to-input matrices about the image centre, as torchvision's
    ``_get_inverse_affine_matrix(center=[0, 0], angle, translate, scale, shear=[shear, 0])`` computes them."""
    rot = p.angle * (math.pi / 180)
    sx = p.shear * (math.pi / 180)
    # rotation-scale-shear with shear_y = 0
    a, b = torch.cos(rot), -torch.cos(rot) * torch.tan(sx) - torch.sin(rot)
    c, d = torch.sin(rot), -torch.sin(rot) * torch.tan(sx) + torch.cos(rot)
    m00, m01, m10, m11 = d / p.scale, -b / p.scale, -c / p.scale, a / p.scale
    m02 = m00 * -p.tx + m01 * -p.ty
    m12 = m10 * -p.tx + m11 * -p.ty
    return torch.stack([torch.stack([m00, m01, m02], 1), torch.stack([m10, m11, m12], 1)], 1)


def coverage(grid: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """What bilinear ``grid_sample`` of an all-ones image with zero padding returns (torchvision samples such a
    mask channel to blend in the fill colour), computed from the grid directly. Per axis it is the in-bounds share
    of the two neighbours' weights, ``clamp(min(u + 1, size - u), 0, 1)`` at input pixel coordinate ``u``; in the
    grid's normalised coordinate ``g`` that is ``clamp(0.5 + size / 2 * (1 - |g|), 0, 1)``."""
    half = grid.new_tensor([w * 0.5, h * 0.5])
    per_axis = grid.abs().mul_(-half).add_(half + 0.5).clamp_(0, 1)
    return per_axis[..., 0] * per_axis[..., 1]


def pixel_grid(theta: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The ``grid_sample`` grid for matrices in centred pixel units, as torchvision's ``_affine_grid`` builds it,
    through ``F.affine_grid`` (whose normalised coordinates are the centred pixel ones scaled by 2 / size)."""
    scale = theta.new_tensor([[1.0, h / w, 2.0 / w], [w / h, 1.0, 2.0 / h]])
    return F.affine_grid(theta * scale, [theta.shape[0], 1, h, w], align_corners=False)
