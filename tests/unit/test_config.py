from pathlib import Path

import pytest
import yaml

from efcm.config import SECTIONS, ConfigError, load_params, params_from_dict

ROOT = Path(__file__).resolve().parents[2]


def test_repo_params_yaml_is_valid_and_complete():
    p = load_params(ROOT / "params.yaml")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert set(raw) == set(SECTIONS), "params.yaml must spell out every section"
    assert p.dataset.classes == ("normal", "tumour")


def test_unknown_key_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"teacher\.archh: unknown key"):
        params_from_dict({"teacher": {"arch": "resnet18", "archh": "x"}})


def test_unknown_section_is_an_error():
    with pytest.raises(ConfigError, match=r"trian_mil: unknown key"):
        params_from_dict({"trian_mil": {}})


def test_out_of_range_value_names_key_and_value():
    with pytest.raises(ConfigError, match=r"train_mil\.folds.*got 1"):
        params_from_dict({"train_mil": {"folds": 1}})


def test_even_median_blur_is_rejected():
    with pytest.raises(ConfigError, match="mthresh must be odd"):
        params_from_dict({"patch": {"tissue": {"mthresh": 4}}})


def test_missing_params_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


def test_params_are_frozen():
    p = params_from_dict({})
    with pytest.raises(Exception, match="frozen"):
        p.seed = 3
