"""MedMNIST v2 files (``dataset=medmnist dataset.file=<bloodmnist_224.npz>``): the ``.npz`` archives the
``medmnist`` package downloads, with their official train/val/test splits and class names.

Each archive holds ``train_images``, ``train_labels``, ``val_images``, ... (uint8 images ``N x H x W`` or
``N x H x W x 3``, labels ``N x 1``). cellcls reads images as files, so an archive is written once into the cache as
PNG files (``$CELLCLS_CACHE/medmnist/<name>-<content hash>/``) with a ``labels.json``; every later run, evaluation
and audit reads those, through the same decoding and resizing as any image.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image

from cellcls.errors import DataError
from cellcls.paths import build_once, cache_dir

SPLIT_ARRAYS = ("train", "val", "test")
# label index -> name, short forms of the medmnist package's INFO (v2, 2D sets with one label per image)
CLASSES: dict[str, list[str]] = {
    "pathmnist": ["adipose", "background", "debris", "lymphocytes", "mucus", "smooth_muscle", "normal_mucosa",
                  "cancer_stroma", "adenocarcinoma_epithelium"],
    "dermamnist": ["actinic_keratosis", "basal_cell_carcinoma", "benign_keratosis", "dermatofibroma", "melanoma",
                   "melanocytic_nevus", "vascular_lesion"],
    "octmnist": ["choroidal_neovascularization", "diabetic_macular_edema", "drusen", "normal"],
    "pneumoniamnist": ["normal", "pneumonia"],
    "retinamnist": ["grade_0", "grade_1", "grade_2", "grade_3", "grade_4"],
    "breastmnist": ["malignant", "normal_or_benign"],
    "bloodmnist": ["basophil", "eosinophil", "erythroblast", "immature_granulocyte", "lymphocyte", "monocyte",
                   "neutrophil", "platelet"],
    "tissuemnist": ["collecting_duct", "distal_convoluted_tubule", "glomerular_endothelial", "interstitial_endothelial",
                    "leukocyte", "podocyte", "proximal_tubule", "thick_ascending_limb"],
    "organamnist": ["bladder", "femur_left", "femur_right", "heart", "kidney_left", "kidney_right", "liver",
                    "lung_left", "lung_right", "pancreas", "spleen"],
}
CLASSES["organcmnist"] = CLASSES["organsmnist"] = CLASSES["organamnist"]
LABELS_FILE = "labels.json"


def flag_name(file: Path) -> str:
    """The MedMNIST flag a file is named after (``bloodmnist_224.npz`` -> ``bloodmnist``)."""
    return file.stem.split("_")[0].lower()


def read_archive(file: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each split's (images, labels), checked: the arrays exist, agree in length, and hold one label per image."""
    try:
        archive = np.load(file, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"dataset.file={file}: not a readable .npz archive ({exc})") from None
    with archive:
        wanted = [f"{s}_{kind}" for s in SPLIT_ARRAYS for kind in ("images", "labels")]
        absent = [name for name in wanted if name not in archive.files]
        if absent:
            raise DataError(f"dataset.file={file}: a MedMNIST archive holds {', '.join(wanted)}; this one lacks "
                            f"{', '.join(absent)} (it holds {', '.join(archive.files) or 'nothing'})")
        splits = {s: (archive[f"{s}_images"], archive[f"{s}_labels"]) for s in SPLIT_ARRAYS}
    for split, (images, labels) in splits.items():
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] != 3):
            raise DataError(f"dataset.file={file}: {split}_images is {images.dtype} {images.shape}; expected uint8 "
                            "N x H x W (grey) or N x H x W x 3 (colour)")
        if labels.ndim == 2 and labels.shape[1] > 1:
            raise DataError(f"dataset.file={file}: {split}_labels has {labels.shape[1]} labels per image (a "
                            "multi-label set such as ChestMNIST); cellcls trains one class per image")
        if len(labels) != len(images):
            raise DataError(f"dataset.file={file}: {split}_images has {len(images)} images but {split}_labels "
                            f"{len(labels)} labels")
    return {s: (images, labels.reshape(-1).astype(np.int64)) for s, (images, labels) in splits.items()}


def ensure_medmnist(file: Path, base: Path | None = None) -> Path:
    """Write the archive's images as PNG files once; returns the folder (later calls find it in the cache)."""
    file = Path(file).expanduser()
    if not file.is_file():
        raise DataError(f"dataset.file={file}: no such file (expected a MedMNIST .npz, e.g. bloodmnist_224.npz)")
    digest = hashlib.sha256()
    with open(file, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    base = (base or cache_dir()) / "medmnist"
    root = base / f"{file.stem}-{digest.hexdigest()[:16]}"

    def fill(folder: Path) -> None:
        labels: dict[str, list[int]] = {}
        for split, (images, split_labels) in read_archive(file).items():
            (folder / split).mkdir()
            for i, pixels in enumerate(images):
                Image.fromarray(pixels).save(folder / split / f"{i:06d}.png")
            labels[split] = split_labels.tolist()
        # labels.json is written last: its presence marks a complete copy
        (folder / LABELS_FILE).write_text(json.dumps({"source": file.name, "labels": labels}))

    return build_once(root, LABELS_FILE, fill)


def split_labels(root: Path) -> dict[str, list[int]]:
    """Each split's labels of a folder :func:`ensure_medmnist` wrote."""
    return json.loads((root / LABELS_FILE).read_text())["labels"]


def class_names(file: Path, labels: dict[str, list[int]], configured: list[str] | None) -> list[str]:
    """``dataset.classes`` when given, else the MedMNIST names of the file's set, else ``class_0`` ... ."""
    count = max(max(v, default=-1) for v in labels.values()) + 1
    names = list(configured) if configured else CLASSES.get(flag_name(file)) or [f"class_{i}" for i in range(count)]
    if count > len(names):
        raise DataError(f"dataset.file={file}: labels go up to {count - 1} but the classes are {len(names)} "
                        f"({', '.join(names)}); set dataset.classes to one name per label")
    return names
