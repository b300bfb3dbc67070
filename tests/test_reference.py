"""scripts/reference.py (the plain-PyTorch equivalent of a run) and scripts/quality.py (cellcls vs it, per recipe)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, TINY, compose_config

from cellcls.data.datamodule import resolve_root

sys.path.insert(0, str(REPO / "scripts"))
import quality  # noqa: E402


def reference(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "reference.py"), *args],
                          capture_output=True, text=True, timeout=600)


def test_the_reference_trains_on_the_runs_own_split_files_and_reports_beside_it(one_epoch_run):
    root = resolve_root(compose_config(*TINY).dataset)
    done = reference(f"run={one_epoch_run}", "epochs=2", f"root={root}", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    ref, own = result["reference"], result["cellcls"]
    assert ref["epochs_run"] == 2
    assert all(0.0 <= ref["test"][k] <= 1.0 for k in ("accuracy", "balanced_accuracy", "roc_auc"))
    assert own == json.loads((one_epoch_run / "test_metrics.json").read_text())


def test_the_reference_table_names_both_sides(one_epoch_run):
    root = resolve_root(compose_config(*TINY).dataset)
    done = reference(f"run={one_epoch_run}", "epochs=1", f"root={root}")
    assert done.returncode == 0, done.stderr[-2000:]
    header, *rows = done.stdout.splitlines()
    assert header.split() == ["test", "metric", "cellcls", "reference"]
    assert [r.split()[0] for r in rows[:4]] == ["accuracy", "balanced_accuracy", "roc_auc", "loss"]


def test_the_reference_refuses_a_folder_that_is_not_a_run(tmp_path):
    done = reference(f"run={tmp_path}")
    assert done.returncode != 0 and "must be a cellcls run folder" in done.stderr


def test_quality_rows_go_into_their_recipes_table(tmp_path):
    doc = tmp_path / "QUALITY.md"
    doc.write_text("# Learning quality\n\nintro\n\n## s1_malaria_lenet\n\ntext\n\n" + quality.HEADER + "\n| old |\n")
    quality.add_row(doc, "s1_malaria_lenet", "| new s1 |")
    quality.add_row(doc, "s2_blood_80", "| new s2 |")
    quality.add_row(doc, "s1_malaria_lenet", "| newer s1 |")
    lines = doc.read_text().splitlines()
    s1, s2 = lines.index("## s1_malaria_lenet"), lines.index("## s2_blood_80")
    assert lines[s1:s2].count("| old |") == 1
    assert lines.index("| old |") < lines.index("| new s1 |") < lines.index("| newer s1 |") < s2
    assert lines[-1] == "| new s2 |" and lines[s2 + 2] == quality.HEADER.splitlines()[0]


def test_the_reference_refuses_a_run_with_settings_it_does_not_reproduce():
    from omegaconf import OmegaConf
    from reference import modern_settings

    seed = OmegaConf.to_container(compose_config("experiment=s1_malaria_lenet"), resolve=True)
    assert modern_settings(seed) == []
    modern = OmegaConf.to_container(compose_config("experiment=malaria_modern"), resolve=True)
    assert modern_settings(modern) == ["optim.decay_norm_and_bias=false", "scheduler.warmup_epochs",
                                       "trainer.ema_decay", "label_smoothing"]
