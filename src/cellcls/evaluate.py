"""``python -m cellcls.evaluate checkpoint=<checkpoint or run folder> [split=test] [data=<dir or table>] [settings]``

Scores a trained model on a split of its data set (rebuilt from the checkpoint alone), on any class-folder
directory (``data=<dir>``) or on a table (``data=<file>.csv|.tsv|.parquet``: read with the run's ``dataset.table``
settings, paths relative to the table's folder, every row), and writes ``<run>/eval/<split or folder>/``: metrics.json (each headline metric with a
95% interval over patients where they are known), report.md, predictions.csv and figures, also logged through the run's loggers (TensorBoard, MLflow).

Settings: split=train|val|test, data=<dir or table>, threshold=<p> (binary: class 1 when its probability >= p; default: the
operating point fitted in training, else the arg-max), interval=grouped|bootstrap (how the 95% intervals are computed:
README, "Intervals"), bootstrap=<n> (resamples for interval=bootstrap, 1000), device=auto|cpu|cuda,
cam_layer=<layer name>, output=<dir>, plots=true|false, group_by=patient (per-patient results and patients.csv;
group_rule=auto|max|mean), group_by=<column> (results per value of a table's metadata column or a DICOM header field,
e.g. site, sex, Manufacturer; many numeric values as quartile bands; subgroups.csv and subgroups.png), tta=none|hflip|vflip|flips (test-time augmentation: logits averaged over flipped copies;
written to <split>_tta-<mode>/), dataset.<key>=<value> to change the data set's settings (e.g. dataset.root=<dir>),
and logger.<name>.<key>=<value> for the loggers (rebuilt from this cellcls's own logger options, never from the
checkpoint's: e.g. logger.mlflow.tracking_uri=<the store the run logged to>).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from cellcls.cli import as_bool, command_args, fail, parse_key_values
from cellcls.errors import ConfigError, DataError
from cellcls.evaluation.evaluate import evaluate
from cellcls.evaluation.subgroups import describe_gap
from cellcls.metric_names import HEADLINE
from cellcls.scoring.multilabel import summary_lines

SETTINGS = ("checkpoint", "split", "data", "threshold", "interval", "bootstrap", "device", "cam_layer", "output", "plots",
            "group_by", "group_rule", "tta")


def main(argv: Sequence[str] | None = None) -> int:
    args, done = command_args(argv, __doc__)
    if done is not None:
        return done
    try:
        own, overrides = parse_key_values(args, SETTINGS, required=("checkpoint",), sections=("dataset", "logger"))
        threshold = float(own["threshold"]) if "threshold" in own else None
        if threshold is not None and not 0 < threshold < 1:
            raise ConfigError(f"threshold={threshold} must be between 0 and 1")
        result, out = evaluate(
            own["checkpoint"], own.get("split", "test"), own.get("data"), overrides, threshold,
            int(own.get("bootstrap", 1000)), own.get("device", "auto"), own.get("cam_layer"), own.get("output"),
            as_bool("plots", own.get("plots", "true")), own.get("group_by"), own.get("group_rule", "auto"),
            own.get("tta"), own.get("interval", "grouped"),
        )
    except (ConfigError, DataError, FileNotFoundError, ValueError, OSError) as exc:
        return fail(exc)
    if result.get("task") == "multilabel":
        print(f"95% intervals: {result['interval']['method']}")
        print("\n".join(summary_lines(result)))
        print(f"written to {out}")
        return 0
    print(f"95% intervals: {result['interval']['method']} unless noted")
    for key in HEADLINE:
        if key in result:
            v, (lo, hi) = result[key]["value"], result[key]["ci95"]
            note = f", {result[key]['method']}" if "method" in result[key] else ""
            print(f"{key:<18} {v:.4f}  (95% CI {lo:.4f} - {hi:.4f}{note})")
    print(f"{'loss':<18} {result['loss']:.4f}")
    cal = result["calibration"]
    print(f"{'ECE':<18} {cal['ece']:.4f}  (Brier {cal['brier']:.4f}, temperature {cal['temperature']:.3f})")
    sets = result.get("prediction_sets")
    if sets:
        lo, hi = sets["coverage"]["ci95"]
        print(f"{'set coverage':<18} {sets['coverage']['value']:.4f}  (95% CI {lo:.4f} - {hi:.4f}; aiming at "
              f"{sets['level']:g}), mean set size {sets['mean_size']:.3f}, single-class sets "
              f"{100 * sets['singletons']:.1f}%")
    if "ood" in result:
        print(f"{'outside':<18} {100 * result['ood']['flagged']:.1f}% of {result['ood']['images']} images flagged "
              f"outside what the model was trained on (validation {result['ood']['level']:g} quantile)")
    if "per_patient" in result:
        patients = result["per_patient"]
        print(f"per patient ({patients['num_images']} patients, rule {patients['rule']}):")
        for key in HEADLINE:
            if key in patients:
                v, (lo, hi) = patients[key]["value"], patients[key]["ci95"]
                print(f"  {key:<16} {v:.4f}  (95% CI {lo:.4f} - {hi:.4f})")
    if "by_subgroup" in result:
        sub = result["by_subgroup"]
        print(f"by {sub['column']}:")
        for s in sub["subgroups"]:
            cells = "  ".join(f"{k} {s[k]['value']:.4f} ({s[k]['ci95'][0]:.4f}-{s[k]['ci95'][1]:.4f})"
                              for k in ("accuracy", "roc_auc") if k in s)
            print(f"  {s['value']:<16} {s['images']:>5} images  {cells}")
        print(f"  {describe_gap(sub['largest_gap'], sub['column'])}")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
