"""Exact and near-duplicate images, clustered: what keeps copies of one original on one side of a split.

How: each image's SIFT keypoints (OpenCV; invariant to rotation, scale and shift, and mirrored by a fixed
permutation of the descriptor, so one extraction serves both orientations); a bag of visual words (scikit-learn's
MiniBatchKMeans vocabulary, tf-idf weighted) whose sparse products propose each image's most similar others, so no
pair loop runs in Python; each proposal confirmed by matching keypoints and fitting one rotation + scale + shift with
RANSAC (OpenCV); confirmed pairs and pixel-identical images joined into clusters (connected components).

Why not perceptual hashing: the blood-cell TRAIN folder holds copies of one smear photo rotated by any angle,
flipped, shifted and padded. imagehash's pHash, even taking the best of the 8 flips and quarter turns, separates
them no better than chance on ``../shared/data`` (pairwise precision 0.02 at recall 0.20), while this pipeline
recovers the photos almost exactly (docs/QUALITY.md).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from scipy import sparse
from scipy.sparse.csgraph import connected_components
from sklearn.cluster import MiniBatchKMeans
from sklearn.preprocessing import normalize
from tqdm.auto import tqdm

from cellcls.config.schema import DuplicatesConfig
from cellcls.data.cache import file_list_key
from cellcls.data.decode import max_pixels, read_image
from cellcls.errors import DataError
from cellcls.paths import cache_dir
from cellcls.infra.run_folder import atomic_write

log = logging.getLogger(__name__)
VERSION = 2
# The SIFT descriptor of a mirrored patch: its 4x4 grid upside down and its 8 orientation bins negated (with the
# keypoint angle a -> 180 - a), checked against OpenCV's descriptors of mirrored images (tests/test_duplicates.py).
MIRROR = np.arange(128).reshape(4, 4, 8)[::-1][..., (-np.arange(8)) % 8].reshape(-1)
# SIFT's default contrast threshold (0.04) leaves smooth images (skin lesions, single cells) a handful of keypoints
CONTRAST = 0.02
PADDING_LEVEL = 8  # pixels this dark are treated as padding (rotated or shifted copies are filled with black)


def root_sift(descriptors: np.ndarray) -> np.ndarray:
    """RootSIFT (Arandjelovic & Zisserman 2012): L1-normalise, square-root; unit length, and it matches better."""
    d = descriptors.astype(np.float32)
    return np.sqrt(d / (d.sum(axis=1, keepdims=True) + 1e-7))


@dataclass
class Fingerprint:
    """An image's keypoints (x, y at the fingerprint scale), their SIFT descriptors (uint8: 38 KB for 300
    keypoints, so 30,000 fingerprints fit in about 1 GB), its width there and a digest of its pixels (equal
    digests: pixel-identical images)."""

    points: np.ndarray
    descriptors: np.ndarray
    width: int
    digest: str

    def mirrored(self) -> tuple[np.ndarray, np.ndarray]:
        """Points and descriptors of the left-right mirrored image."""
        points = self.points.copy()
        points[:, 0] = self.width - 1 - points[:, 0]
        return points, np.ascontiguousarray(self.descriptors[:, MIRROR])


@dataclass
class Duplicates:
    """The clusters of a list of files: ``cluster[i]`` is file i's cluster id (a file alone has its own), the
    confirmed pairs as ``(i, j, inliers)`` (``inliers`` -1: pixel-identical) and the files that could not be read."""

    cluster: np.ndarray
    pairs: list[tuple[int, int, int]] = field(default_factory=list)
    unreadable: dict[int, str] = field(default_factory=dict)

    def members(self) -> dict[int, list[int]]:
        """Clusters with more than one file: id -> file indices."""
        out: dict[int, list[int]] = {}
        for i, c in enumerate(self.cluster.tolist()):
            out.setdefault(c, []).append(i)
        return {c: m for c, m in out.items() if len(m) > 1}


def fingerprint(path: Path, settings: DuplicatesConfig) -> Fingerprint:
    """The fingerprint of one image file (:class:`DataError` when it cannot be read)."""
    im = read_image(path, 1)
    digest = hashlib.sha1(im.tobytes() + f"{im.size}".encode()).hexdigest()
    # one scale for every image, small ones enlarged: a resized copy then matches its original at scale 1
    scale = settings.max_side / max(im.size)
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.BILINEAR)
    grey = np.asarray(im)
    # no keypoints on or beside padding: its edges look alike in every rotated copy and would make them similar
    content = cv2.erode((grey > PADDING_LEVEL).astype(np.uint8) * 255, np.ones((5, 5), np.uint8))
    keypoints, descriptors = cv2.SIFT_create(nfeatures=settings.keypoints, contrastThreshold=CONTRAST).detectAndCompute(grey, content)
    if descriptors is None:
        return Fingerprint(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.uint8), grey.shape[1], digest)
    points = np.array([k.pt for k in keypoints], np.float32)
    # OpenCV's SIFT values are whole numbers clipped to 0-255: uint8 keeps them exactly
    return Fingerprint(points, np.clip(np.rint(descriptors), 0, 255).astype(np.uint8), grey.shape[1], digest)


def fingerprints(
    paths: Sequence[Path], settings: DuplicatesConfig, progress: bool = True
) -> tuple[list[Fingerprint | None], dict[int, str]]:
    """Fingerprints of ``paths`` on all cores (OpenCV and Pillow release the GIL); unreadable ones are None."""
    def one(path: Path) -> Fingerprint | str:
        try:
            return fingerprint(path, settings)
        except DataError as exc:
            return str(exc)

    prints: list[Fingerprint | None] = []
    unreadable: dict[int, str] = {}
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        done = tqdm(pool.map(one, paths), total=len(paths), desc="fingerprinting", disable=not progress,
                    mininterval=1.0, leave=False)
        for i, result in enumerate(done):
            if isinstance(result, str):
                unreadable[i] = result
                prints.append(None)
            else:
                prints.append(result)
    return prints, unreadable


def _both_orientations(p: Fingerprint | None) -> np.ndarray:
    if p is None or not len(p.descriptors):
        return np.zeros((0, 128), np.float32)
    return root_sift(np.concatenate([p.descriptors, p.descriptors[:, MIRROR]]))


def word_bags(prints: Sequence[Fingerprint | None], seed: int = 0, chunk: int = 512) -> sparse.csr_matrix:
    """Each image's tf-idf weighted, L2-normalised bag of visual words over both of its orientations."""
    counts = np.array([0 if p is None else 2 * len(p.descriptors) for p in prints])
    n_words = int(np.clip(counts.sum() // 100, 2, 1024))
    if counts.sum() < n_words * 2:
        return sparse.csr_matrix((len(prints), 1))
    rng = np.random.default_rng(seed)
    sample, taken = [], 0
    for i in rng.permutation(len(prints)):  # the vocabulary is learnt from about 100,000 descriptors
        if taken >= 100_000:
            break
        sample.append(_both_orientations(prints[i]))
        taken += len(sample[-1])
    vocabulary = MiniBatchKMeans(n_words, random_state=seed, batch_size=4096, n_init=1).fit(np.concatenate(sample))
    words = np.concatenate([vocabulary.predict(np.concatenate([_both_orientations(p) for p in prints[s:s + chunk]]))
                            for s in range(0, len(prints), chunk) if counts[s:s + chunk].sum()])
    rows = np.repeat(np.arange(len(prints)), counts)
    bags = sparse.csr_matrix((np.ones(len(words)), (rows, words)), shape=(len(prints), n_words))
    bags.sum_duplicates()
    document_frequency = np.asarray((bags > 0).sum(axis=0)).ravel()
    idf = np.log(len(prints) / (document_frequency + 1.0)) + 1.0
    return normalize(bags.multiply(idf).tocsr())


def candidate_pairs(bags: sparse.csr_matrix, neighbours: int, min_similarity: float, chunk: int = 1024) -> np.ndarray:
    """Pairs ``(similarity, i, j)``, i < j, from each image's ``neighbours`` most similar bags, most similar first."""
    found: list[np.ndarray] = []
    n = bags.shape[0]
    for start in range(0, n, chunk):
        block = (bags[start:start + chunk] @ bags.T).toarray()
        rows = np.arange(block.shape[0])
        block[rows, rows + start] = 0.0
        k = min(neighbours, n - 1)
        if k <= 0:
            break
        top = np.argpartition(-block, k - 1, axis=1)[:, :k]
        similarity = block[rows[:, None], top]
        keep = similarity >= min_similarity
        i = np.broadcast_to(rows[:, None] + start, top.shape)[keep]
        j = top[keep]
        found.append(np.stack([similarity[keep], np.minimum(i, j), np.maximum(i, j)], axis=1))
    if not found:
        return np.zeros((0, 3))
    pairs = np.concatenate(found)
    pairs = pairs[np.lexsort((pairs[:, 2], pairs[:, 1], -pairs[:, 0]))]
    _, first = np.unique(pairs[:, 1:], axis=0, return_index=True)
    return pairs[np.sort(first)]


def matching_keypoints(a: Fingerprint, b: Fingerprint, settings: DuplicatesConfig) -> int:
    """How many keypoints of ``a`` and ``b`` agree on one rotation + scale + shift, directly or mirrored: 0 unless
    they are at least ``settings.min_inlier_fraction`` of the sparser image's keypoints and the scale is plausible."""
    fewest = min(len(a.descriptors), len(b.descriptors))
    if fewest < settings.min_inliers:
        return 0
    best = 0
    query = root_sift(a.descriptors)
    for points, descriptors in ((b.points, b.descriptors), b.mirrored()):
        # RootSIFT descriptors have unit length: the nearest have the largest dot products
        similarity = query @ root_sift(descriptors).T
        rows = np.arange(len(similarity))
        nearest = similarity.argmax(axis=1)
        first = similarity[rows, nearest]
        similarity[rows, nearest] = -np.inf
        second = similarity.max(axis=1) if similarity.shape[1] > 1 else np.full_like(first, -np.inf)
        d1 = np.sqrt(np.maximum(2 - 2 * first, 0))
        d2 = np.sqrt(np.maximum(2 - 2 * second, 0))
        good = np.flatnonzero(d1 < 0.8 * d2)  # Lowe's ratio test
        if len(good) < settings.min_inliers:
            continue
        source, target = a.points[good], points[nearest[good]]
        tolerance = 3.0 * max(a.width, b.width) / 256
        transform, inliers = cv2.estimateAffinePartial2D(source, target, method=cv2.RANSAC,
                                                         ransacReprojThreshold=tolerance)
        if transform is None:
            continue
        # copies are fingerprinted at one size, so they match at a scale near 1 (up to 2 for a crop); rulers,
        # hairs and padding corners give degenerate fits that squeeze many points onto one
        if not 0.5 <= float(np.sqrt(abs(np.linalg.det(transform[:, :2])))) <= 2.0:
            continue
        distinct = len(np.unique(nearest[good][inliers.ravel() > 0]))
        if distinct >= settings.min_inlier_fraction * fewest:
            best = max(best, distinct)
    return best


class _Components:
    """Union-find over image indices."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def join(self, i: int, j: int) -> None:
        self.parent[self.find(i)] = self.find(j)


def find_duplicates(
    paths: Sequence[Path], settings: DuplicatesConfig | None = None, progress: bool = True, seed: int = 0,
    timings: dict[str, float] | None = None,
) -> Duplicates:
    """Cluster ``paths`` into near-duplicate groups (see the module docstring); ``timings`` receives each stage's
    seconds (fingerprints, candidates, checks) and the number of pairs checked."""
    settings = settings or DuplicatesConfig()
    timings = {} if timings is None else timings
    started = time.perf_counter()
    prints, unreadable = fingerprints(paths, settings, progress)
    timings["fingerprints"] = time.perf_counter() - started
    components = _Components(len(paths))
    confirmed: list[tuple[int, int, int]] = []
    first_of: dict[str, int] = {}
    for i, p in enumerate(prints):
        if p is None:
            continue
        if p.digest in first_of:
            confirmed.append((first_of[p.digest], i, -1))
            components.join(first_of[p.digest], i)
        else:
            first_of[p.digest] = i
    started = time.perf_counter()
    candidates = candidate_pairs(word_bags(prints, seed), settings.neighbours, settings.min_similarity)
    timings["candidates"] = time.perf_counter() - started
    started, checked = time.perf_counter(), 0
    bar = tqdm(total=len(candidates), desc="checking candidates", disable=not progress, mininterval=1.0, leave=False)
    batch = 8 * (os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # OpenCV releases the GIL
        for start in range(0, len(candidates), batch):
            # pairs already joined through others are skipped: the cluster is the same either way
            todo = [(int(i), int(j)) for _, i, j in candidates[start:start + batch]
                    if components.find(int(i)) != components.find(int(j))]
            found = pool.map(lambda ij: matching_keypoints(prints[ij[0]], prints[ij[1]], settings), todo)
            checked += len(todo)
            for (i, j), inliers in zip(todo, found, strict=True):
                if inliers >= settings.min_inliers:
                    confirmed.append((i, j, inliers))
                    components.join(i, j)
            bar.update(min(batch, len(candidates) - start))
    bar.close()
    timings["checks"], timings["checked"] = time.perf_counter() - started, checked
    graph = sparse.coo_matrix((np.ones(len(confirmed)), ([c[0] for c in confirmed], [c[1] for c in confirmed])),
                              shape=(len(paths), len(paths)))
    _, cluster = connected_components(graph, directed=False)
    return Duplicates(cluster.astype(np.int64), confirmed, unreadable)


def cached_duplicates(
    paths: Sequence[Path], settings: DuplicatesConfig | None = None, progress: bool = True
) -> Duplicates:
    """:func:`find_duplicates`, kept in ``<cache>/duplicates/`` for exactly these files (sizes and modification
    times) and settings: the audit and every later run on the same data reuse it."""
    settings = settings or DuplicatesConfig()
    key = file_list_key(paths, f"duplicates v{VERSION}|{sorted(vars(settings).items())}|{max_pixels()}")
    entry = cache_dir() / "duplicates" / f"{key}.npz"
    if entry.is_file():
        with np.load(entry, allow_pickle=False) as saved:
            unreadable = dict(zip(saved["unreadable_index"].tolist(), saved["unreadable_reason"].tolist(), strict=True))
            pairs = [tuple(int(v) for v in row) for row in saved["pairs"]]
            return Duplicates(saved["cluster"], pairs, unreadable)  # type: ignore[arg-type]
    log.info("looking for near-duplicate images among %d files (once; cached in %s)", len(paths), entry.parent)
    found = find_duplicates(paths, settings, progress)

    def save(fh) -> None:
        np.savez(fh, cluster=found.cluster, pairs=np.array(found.pairs, np.int64).reshape(-1, 3),
                 unreadable_index=np.array(list(found.unreadable), np.int64),
                 unreadable_reason=np.array(list(found.unreadable.values()), dtype=str))

    atomic_write(entry, save)
    return found
