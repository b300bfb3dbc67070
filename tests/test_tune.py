"""python -m cellcls.tune (issue 16): Optuna >= 4 searches with pruning, resumable and shared by worker processes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import TINY, compose_config, run_cli

from cellcls.errors import ConfigError

optuna = pytest.importorskip("optuna", minversion="4.9", reason="the sweep extra (pip install -e '.[sweep]')")

from cellcls.training.tune import load_search, suggest  # noqa: E402

SPACE = """
params:
  optim: {choices: [adam, sgd]}
  optim.lr: {low: 1.0e-3, high: 2.0e-2, log: true}
  optim.momentum: {low: 0.8, high: 0.95, when: {optim: sgd}}
  dataset.batch_size: {choices: [16, 32]}
"""


def search_file(tmp_path: Path, trials: int = 3, pruner: str = "{name: none}", epochs: int = 2) -> Path:
    overrides = json.dumps([f"trainer.max_epochs={epochs}", "logger=csv", "callbacks.early_stopping=null",
                            *[o for o in TINY if o != "dataset.batch_size=16"]])
    path = tmp_path / "search.yaml"
    path.write_text(f"study: tiny\ntrials: {trials}\nsampler: {{name: random, seed: 0}}\npruner: {pruner}\n"
                    f"overrides: {overrides}\n{SPACE}")
    return path


def read_rows(file: Path) -> list[dict]:
    with file.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_an_unknown_key_in_a_search_file_is_refused_with_the_nearest(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("trails: 5\n" + SPACE)
    with pytest.raises(ConfigError, match="unknown key 'trails'; did you mean 'trials'"):
        load_search(path)


def test_a_parameter_listed_under_when_must_come_first(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("params:\n  optim.momentum: {low: 0.8, high: 0.9, when: {optim: sgd}}\n"
                    "  optim: {choices: [adam, sgd]}\n")
    with pytest.raises(ConfigError, match="params.optim.momentum.when names 'optim', which must be a parameter listed"):
        load_search(path)


def test_a_conditional_parameter_is_sampled_only_under_its_choice(tmp_path):
    params = load_search(search_file(tmp_path)).params
    adam = suggest(optuna.trial.FixedTrial({"optim": "adam", "optim.lr": 0.01, "dataset.batch_size": 16}), params)
    sgd = suggest(optuna.trial.FixedTrial({"optim": "sgd", "optim.lr": 0.01, "optim.momentum": 0.9,
                                           "dataset.batch_size": 16}), params)
    assert "optim.momentum" not in adam and sgd["optim.momentum"] == 0.9


def test_the_shipped_search_composes_with_every_choice_it_can_make():
    spec = load_search("malaria")
    for optim in spec.params["optim"].choices:
        cfg = compose_config(*spec.overrides, f"optim={optim}", "optim.lr=0.001", "dataset.root=/data")
        assert cfg.optim.name == optim and cfg.trainer.max_epochs == 20


def test_a_search_runs_its_trials_writes_the_summary_plots_and_best_experiment_and_resumes(tmp_path, capsys):
    from cellcls import tune

    search, out = search_file(tmp_path), tmp_path / "study"
    assert tune.main([f"search={search}", f"output={out}"]) == 0
    printed = capsys.readouterr().out
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{out / 'study.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    assert study.direction.name == "MINIMIZE"  # trainer.monitor=val_loss
    rows = read_rows(out / "summary.csv")
    assert [float(r["value"]) for r in rows] == sorted(t.value for t in study.trials)
    for r in rows:  # each trial is an ordinary run folder whose result is the trial's value
        result = json.loads((Path(r["run_dir"]) / "result.json").read_text())
        assert result["status"] == "ok" and result["best"] == pytest.approx(float(r["value"]))
    assert {"optimization_history.png", "parallel_coordinate.png"} <= {p.name for p in out.glob("*.png")}
    assert "experiment=best" in printed

    best = compose_config(f"hydra.searchpath=[file://{out / 'configs'}]", "experiment=best")
    trial = study.best_trial
    assert best.optim.name == trial.params["optim"] and best.optim.lr == pytest.approx(trial.params["optim.lr"])
    assert best.dataset.batch_size == trial.params["dataset.batch_size"] and best.trainer.max_epochs == 2

    assert tune.main([f"search={search}", f"output={out}", "trials=4"]) == 0  # the same command resumes
    assert len(optuna.load_study(study_name="tiny", storage=f"sqlite:///{out / 'study.db'}").trials) == 4


def test_a_pruned_trial_stops_early_and_its_run_folder_says_so(tmp_path):
    from cellcls import tune

    # a threshold no loss meets: every trial is stopped after its first epoch past the warm-up
    search = search_file(tmp_path, trials=2, pruner="{name: threshold, upper: 0.0, n_warmup_steps: 2}", epochs=4)
    out = tmp_path / "study"
    assert tune.main([f"search={search}", f"output={out}"]) == 0
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{out / 'study.db'}")
    assert [t.state.name for t in study.trials] == ["PRUNED", "PRUNED"]
    for t in study.trials:
        run = Path(t.user_attrs["run_dir"])
        result = json.loads((run / "result.json").read_text())
        assert result["status"] == "pruned" and result["pruned_at_epoch"] == 2 and t.user_attrs["epochs"] == 2
        assert (run / "checkpoints" / "best.pt").is_file()
    assert not (out / "configs").exists()  # no finished trial, no best configuration


def test_a_journal_file_holds_the_study_when_given_and_the_same_command_resumes_it(tmp_path):
    from cellcls import tune

    search, journal = search_file(tmp_path, trials=1, epochs=1), tmp_path / "shared" / "study.log"
    for trials in (1, 2):
        assert tune.main([f"search={search}", f"output={tmp_path / 'out'}", f"storage={journal}", f"trials={trials}"]) == 0
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    assert [t.state.name for t in optuna.load_study(study_name="tiny", storage=storage).trials] == ["COMPLETE"] * 2
    assert not (tmp_path / "out" / "study.db").exists()


def test_with_cv_folds_a_trial_is_worth_its_cross_validated_score(tmp_path):
    from cellcls import tune

    search, out = search_file(tmp_path, trials=1, epochs=1), tmp_path / "study"
    assert tune.main([f"search={search}", f"output={out}", "cv.folds=2"]) == 0
    [trial] = optuna.load_study(study_name="tiny", storage=f"sqlite:///{out / 'study.db'}").trials
    cv = json.loads((Path(trial.user_attrs["run_dir"]) / "cv_metrics.json").read_text())
    assert trial.value == pytest.approx(cv["mean"]["loss"]) and trial.user_attrs["epochs"] == 2


def test_worker_processes_share_one_study(tmp_path):
    search, out = search_file(tmp_path, trials=4), tmp_path / "study"
    result = run_cli("cellcls.tune", f"search={search}", f"output={out}", "jobs=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{out / 'study.db'}")
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE"] * 4
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2
    assert len(read_rows(out / "summary.csv")) == 4


def start_search(tmp_path: Path, out: Path, trials: int):
    """``python -m cellcls.tune`` as a subprocess, returned once trial 0 has a resumable checkpoint."""
    import subprocess
    import sys
    import time

    search = search_file(tmp_path, trials=trials, epochs=8)
    proc = subprocess.Popen([sys.executable, "-m", "cellcls.tune", f"search={search}", f"output={out}"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not (out / "trials" / "000" / "checkpoints" / "last.pt").is_file():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    return proc, search


def trials_of(out: Path):
    return optuna.load_study(study_name="tiny", storage=f"sqlite:///{out / 'study.db'}").trials


@pytest.mark.slow
def test_a_search_killed_mid_trial_retries_that_trial_from_its_checkpoint_and_samples_on(tmp_path):
    import signal

    out = tmp_path / "study"
    proc, search = start_search(tmp_path, out, trials=3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [t.state.name for t in trials_of(out)] == ["RUNNING"]
    again = run_cli("cellcls.tune", f"search={search}", f"output={out}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "3 trial(s) to go" in again.stderr and "trial 0 was killed: queued again, continuing" in again.stderr
    trials = trials_of(out)
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE", "COMPLETE"]
    retry = trials[1]
    assert retry.user_attrs["failed_trial"] == 0 and retry.params == trials[0].params
    assert retry.user_attrs["run_dir"] == str(out / "trials" / "000")  # the killed run, continued
    assert "resumed from" in (out / "trials" / "000" / "train.log").read_text()
    lrs = [t.params["optim.lr"] for t in trials[1:]]
    assert len(set(lrs)) == 3  # the restart samples on instead of replaying trial 0's values


@pytest.mark.slow
def test_sigterm_stops_the_search_after_a_step_and_the_same_command_continues_the_trial(tmp_path):
    import signal

    out = tmp_path / "study"
    proc, search = start_search(tmp_path, out, trials=2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err and err.count("cellcls: interrupted by SIGTERM") == 1
    assert [t.state.name for t in trials_of(out)] == ["FAIL", "WAITING"]  # nothing else ran
    again = run_cli("cellcls.tune", f"search={search}", f"output={out}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    trials = trials_of(out)
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert trials[1].user_attrs["resume_from"] == str(out / "trials" / "000")
