"""The typed config: one default per setting, unknown keys refused with the nearest valid name."""

from __future__ import annotations

import pytest
from conftest import compose_config, run_cli

from cellcls.config import check_command_line
from cellcls.training.validate import validate
from cellcls.config.schema import DatasetConfig, TrainerConfig
from cellcls.errors import ConfigError


def test_a_plus_prefixed_typo_is_refused_naming_the_setting_meant(tmp_path):
    result = run_cli("cellcls.train", "+trainer.max_epoch=3", cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown setting 'trainer.max_epoch'; did you mean 'trainer.max_epochs'?" in result.stderr
    assert not (tmp_path / "outputs").exists()


def test_a_typo_without_plus_names_the_nearest_key_too():
    with pytest.raises(ConfigError, match="did you mean 'dataset.batch_size'"):
        check_command_line(["dataset=malaria", "dataset.batch_sise=8"])


def test_a_typo_inside_a_model_option_is_checked_against_that_models_arguments():
    with pytest.raises(ConfigError, match="did you mean 'model.dropout'"):
        validate(compose_config("model=lenet", "+model.dropuot=0.3"))


def test_an_optimisers_keys_are_its_torch_arguments():
    validate(compose_config("optim=sgd", "+optim.dampening=0.1"))  # a real SGD argument, not in the YAML
    with pytest.raises(ConfigError, match="did you mean 'optim.momentum'"):
        validate(compose_config("optim=sgd", "+optim.momentun=0.1"))


def test_a_callbacks_arguments_are_checked_against_its_class():
    with pytest.raises(ConfigError, match="did you mean 'callbacks.early_stopping.patience'"):
        validate(compose_config("+callbacks.early_stopping.patiense=2"))


def test_a_wrongly_typed_value_is_refused_when_hydra_composes():
    with pytest.raises(Exception, match="gradient_clip"):
        compose_config("trainer.gradient_clip=abc")


def test_sweeps_and_new_callback_entries_are_not_typos():
    check_command_line(["-m", "optim.lr=1e-3,1e-2", "model=lenet,xray_cnn", "logger=[csv,mlflow]",
                        "logger.mlflow.experiment=x"])


def test_defaults_live_in_the_schema_and_the_yaml_only_states_differences():
    cfg = compose_config("dataset=malaria")
    assert cfg.trainer.max_epochs == TrainerConfig.max_epochs
    assert cfg.dataset.batch_size == DatasetConfig.batch_size and cfg.dataset.search_depth == DatasetConfig.search_depth
    assert cfg.dataset.split_by == "patient"  # malaria.yaml's own setting


def test_the_readmes_model_init_override_works():
    assert compose_config("model.init=keras").model.init == "keras"


def test_plateau_settings_have_one_source():
    from cellcls.config.schema import GROUPS  # noqa: F401 - the import registers the schema

    cfg = compose_config("scheduler=plateau")
    assert (cfg.scheduler.factor, cfg.scheduler.patience) == (0.3, 2)


def test_every_optimiser_takes_the_parameter_grouping_settings_from_one_schema():
    from cellcls.config.schema import ParamGroupsConfig

    for optim in ("adam", "adamw", "sgd", "adagrad", "adadelta"):
        cfg = compose_config(f"optim={optim}", "optim.backbone_lr_scale=0.1")
        validate(cfg)
        assert cfg.optim.decay_norm_and_bias == ParamGroupsConfig.decay_norm_and_bias
        assert cfg.optim.backbone_lr_scale == 0.1


@pytest.mark.parametrize(("override", "message"), [
    ("label_smoothing=1.5", "label_smoothing must be a number in \\[0, 1\\)"),
    ("trainer.ema_decay=1.0", "trainer.ema_decay must be between 0 and 1"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches must be an integer >= 1"),
])
def test_fine_tuning_settings_out_of_range_are_refused_by_name(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_config(override))


def test_a_timm_models_options_are_checked_against_its_arguments():
    validate(compose_config("model=timm", "model.arch=efficientnet_b0", "model.drop_path_rate=0.1"))
    with pytest.raises(ConfigError, match="did you mean 'model.pretrained'"):
        validate(compose_config("model=timm", "+model.pretrainde=true"))
