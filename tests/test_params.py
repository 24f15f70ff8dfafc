"""params.yaml overrides (`model_quality.py --set`, the quality sweep): dotted keys, YAML values, clear errors."""

from __future__ import annotations

import pytest

from components.config import PACKAGE_ROOT, load_params, override_param
from components.errors import UsageError
from components.training.params import augment_params, train_params


def test_overrides_set_nested_keys_with_yaml_values() -> None:
    params = load_params(PACKAGE_ROOT / "params.yaml", ["train.profiles.cpu.epochs=150",
                                                        "augment.affine_scale=[0.9, 1.1]",
                                                        "train.profiles.cpu.ema_decay=null"])
    cpu = train_params(params).profiles["cpu"]
    assert cpu.epochs == 150 and cpu.ema_decay is None
    assert tuple(augment_params(params).affine_scale) == (0.9, 1.1)
    assert train_params(load_params(PACKAGE_ROOT / "params.yaml")).profiles["cpu"].epochs != 150


@pytest.mark.parametrize("assignment, message", [
    ("train.profiles.cpu.epochs", "write KEY=VALUE"),
    ("train.profilez.cpu.epochs=3", "train.profilez is not a section"),
    ("train.profiles.cpu.epochs.x=3", "train.profiles.cpu.epochs is not a section"),
    ("augment.affine_scale=[0.9", "not valid YAML"),
])
def test_a_bad_override_is_a_usage_error_naming_it(assignment: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        override_param({"train": {"profiles": {"cpu": {"epochs": 40}}}, "augment": {}}, assignment)


def test_an_unknown_profile_key_fails_validation() -> None:
    params = load_params(PACKAGE_ROOT / "params.yaml", ["train.profiles.cpu.epochz=3"])
    with pytest.raises(UsageError, match="epochz"):
        train_params(params)


def test_a_broken_params_file_is_one_line_naming_the_place(tmp_path) -> None:
    text = (PACKAGE_ROOT / "params.yaml").read_text()
    typo = tmp_path / "typo.yaml"
    typo.write_text(text.replace("dataset: magnetic-tile ", "dataset: magnetic-tiles ", 1))
    with pytest.raises(UsageError) as bad_name:
        load_params(typo)
    message = str(bad_name.value)
    assert "data.dataset 'magnetic-tiles' is not one of datasets" in message and "fix that key" in message
    assert "\n" not in message and "input_value" not in message and "errors.pydantic.dev" not in message
    broken = tmp_path / "broken.yaml"
    broken.write_text("base:\n  seed: [42\ndata: {}\n")
    with pytest.raises(UsageError, match=r"not valid YAML at line 3, column 5 \(.*\); fix the file") as bad_yaml:
        load_params(broken)
    assert "\n" not in str(bad_yaml.value)

