"""``python -m cellcls.data.inspect dataset=<name> dataset.root=<dir> [overrides]``: what a run would train on.

Prints the folders found, images per class per split, class balance, image sizes and modes, ignored files and the
class weights the run would use. Takes the same overrides (and ``--config-dir``) as ``cellcls.train``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from cellcls.training.validate import validate
from cellcls.config.schema import DatasetConfig, typed
from cellcls.data.datamodule import make_splits, resolve_root
from cellcls.data.layouts import scan
from cellcls.data.splits import group_source
from cellcls.data.summary import count_table, image_properties
from cellcls.errors import ConfigError, DataError
from cellcls.paths import config_dir
from cellcls.data.findings import positives_per_finding
from cellcls.scoring.losses import balanced_class_weights, positive_weights


def group_lines(ds: DatasetConfig, splits: dict) -> list[str]:
    """How many patients (groups) each split holds and how many it shares with train: what makes a split honest."""
    source = group_source(ds)
    if source is None or any(samples.groups is None for samples in splits.values()):
        return ["patients/groups: not known (none of dataset.group_pattern, dataset.group_tag, dataset.table.group is "
                "set), so a split cannot keep one patient's images together; counts are images"]
    groups = {name: set(samples.groups or []) for name, samples in splits.items()}
    lines = [f"patients/groups per split ({source}):"]
    for name, found in groups.items():
        shared = f"; {len(found & groups['train'])} also in train" if name != "train" else ""
        lines.append(f"  {name:<5} {len(found)}{shared}")
    return lines


def describe(cfg: DictConfig) -> str:
    """The report ``inspect`` prints for a composed training config."""
    ds = typed(cfg.dataset, DatasetConfig)
    root = resolve_root(ds)
    scanned = scan(ds, root)
    classes, ignored = scanned.classes, scanned.ignored
    splits, leaks = make_splits(ds, scanned.splits, classes, int(cfg.seed))
    lines = [f"data set {ds.name} at {root}"]
    lines += [f"  {name:<5} folder: {path}" for name, path in scanned.folders.items()]
    if ds.table is not None:
        lines.append(f"  table: {ds.table.file} ({', '.join(f'{n} {len(s)}' for n, s in scanned.splits.items())} "
                     f"images by its split column)" if ds.table.split else f"  table: {ds.table.file}")
    if scanned.missing:
        lines.append(f"  {len(scanned.missing)} row(s) name a missing file (skipped), e.g. {scanned.missing[0][1]}")
    held = [s for s in ("val", "test") if s in splits and s not in scanned.splits]
    if held:
        lines.append(f"  held out of train: {', '.join(held)} (split_by={ds.split_by}, seed={cfg.seed})")
    multi = splits["train"].multilabel
    lines += ["", "images per class:", count_table(splits, classes), "",
              "prevalence of each finding:" if multi else "class balance:"]
    for name, samples in splits.items():
        if samples.targets is not None:
            counts = positives_per_finding(samples.targets, classes)
            shares = ", ".join(f"{c} {p / max(p + n, 1):.1%}" for c, (p, n) in counts.items())
        else:
            shares = ", ".join(f"{c} {samples.labels.count(i) / len(samples):.1%}" for i, c in enumerate(classes))
        lines.append(f"  {name:<5} {shares}")
    lines += ["", *group_lines(ds, splits)]
    lines += [f"  leakage: {leak.message()}" for leak in leaks] or ["  no held-out image shares a known group with train"]
    lines += ["", "images:"]
    for name, samples in splits.items():
        props = image_properties(samples)
        if props["width"] is None:
            lines.append(f"  {name:<5} no readable image headers")
            continue
        (w0, w1), (h0, h1) = props["width"], props["height"]
        modes = ", ".join(f"{m} {n}" for m, n in sorted(props["modes"].items()))
        bad = f"; {len(props['unreadable'])} unreadable" if props["unreadable"] else ""
        if props["too_large"]:
            bad += f"; {len(props['too_large'])} over the pixel limit (skipped in training), e.g. {props['too_large'][0]}"
        lines.append(f"  {name:<5} width {w0}-{w1}, height {h0}-{h1} px; modes: {modes}{bad}")
    h, w = ds.image_size
    lines.append(f"  resized to {h}x{w}, {'grayscale' if int(ds.channels) == 1 else 'RGB'}")
    lines.append(f"  non-image files ignored: {len(ignored)}" + (f" (e.g. {ignored[0]})" if ignored else ""))
    if splits["train"].multilabel:  # one sigmoid per finding: BCE's positive weights, not class weights
        weights = positive_weights(splits["train"].training_targets())  # type: ignore[arg-type]
        used = "used" if str(ds.table.pos_weight) == "balanced" else "not used: dataset.table.pos_weight=none"
        lines += ["", f"finding positive weights, negatives / positives ({used}): "
                  + ", ".join(f"{c} {float(x):.3f}" for c, x in zip(classes, weights))]
        return "\n".join(lines)
    weights = balanced_class_weights(splits["train"].labels, len(classes))
    used = "used" if cfg.class_weights == "balanced" else "not used: class_weights=none"
    lines += ["", f"class weights, balanced ({used}): " + ", ".join(f"{c} {float(x):.3f}" for c, x in zip(classes, weights))]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if "--config-dir" in args:
        i = args.index("--config-dir")
        args[i : i + 2] = [f"hydra.searchpath=[file://{args[i + 1]}]"]
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(config_name="train", overrides=args)
        validate(cfg)
        print(describe(cfg))
    except (ConfigError, DataError) as exc:
        print(f"cellcls: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
