"""The strategy table and the per-stage params: every configuration `dvc repro` accepts is one
every stage (and so every KFP component) accepts, for every method and strategy set."""

import inspect
import itertools

import pytest
import yaml

import components as c
from efcm import registry
from efcm.config import (
    STAGE_SECTIONS,
    ConfigError,
    for_stage,
    load_params,
    params_for_stage,
    params_from_dict,
    params_to_dict,
)
from tests.conftest import ROOT, tiny_params_dict

METHODS = ("vfd", "fpd", "mcm")


def _with(method: str, strategies, export: str | None = None) -> dict:
    raw = tiny_params_dict()
    raw["distill"] = {**raw["distill"], "method": method}
    raw["mil"] = {**raw["mil"], "strategies": strategies}
    if export:
        raw["export"] = {**raw["export"], "strategy": export}
    return raw


def _allowed_sets(method: str) -> list:
    applicable = [n for n, s in registry.STRATEGIES.items() if s.applies_to(method) is None]
    subsets = [
        list(combo)
        for r in range(1, len(applicable) + 1)
        for combo in itertools.combinations(applicable, r)
    ]
    return ["auto", *subsets]


def test_auto_compares_every_strategy_that_applies_and_says_why_the_others_are_left_out():
    run, left_out = registry.resolve("vfd", "auto")
    assert run == list(registry.NAMES) and left_out == {}
    run, left_out = registry.resolve("mcm", "auto")
    assert "reuse" not in run and set(run) == set(registry.NAMES) - {"reuse"}
    assert "MCM-KD" in left_out["reuse"] and "teacher's feature space" in left_out["reuse"]


def test_one_key_switches_the_method_with_the_shipped_params_yaml():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert raw["mil"]["strategies"] == "auto"
    for method in METHODS:
        raw["distill"]["method"] = method
        params = params_from_dict(raw)
        assert params.distill.method == method


def test_an_explicit_list_naming_a_strategy_that_does_not_apply_stays_an_error():
    with pytest.raises(ConfigError, match=r"mil\.strategies includes 'reuse'.*'mcm'"):
        params_from_dict(_with("mcm", ["reuse", "retrain"]))
    with pytest.raises(ConfigError, match=r"unknown strategies \['bogus'\]"):
        params_from_dict(_with("vfd", ["retrain", "bogus"]))
    with pytest.raises(ConfigError, match=r"export\.strategy 'etc' is not one of"):
        params_from_dict(_with("vfd", ["retrain"], export="etc"))


@pytest.mark.parametrize("method", METHODS)
def test_every_stage_accepts_every_allowed_configuration(method):
    for strategies in _allowed_sets(method):
        run, _ = registry.resolve(method, strategies if strategies == "auto" else tuple(strategies))
        raw = _with(method, strategies, export=run[0])
        full = params_from_dict(raw)
        data = params_to_dict(full)
        for stage, sections in STAGE_SECTIONS.items():
            params = params_for_stage(stage, {s: data[s] for s in sections})
            for s in sections:
                assert getattr(params, s) == getattr(full, s), (stage, s)


def test_a_stage_reading_a_section_it_was_not_given_fails_loudly():
    params = for_stage(load_params(ROOT / "params.yaml"), "gate")
    assert params.deploy.max_auc_drop >= 0
    with pytest.raises(ConfigError, match=r"stage 'gate' read mil\.strategies.*STAGE_SECTIONS"):
        _ = params.mil.strategies


def test_params_for_stage_names_a_missing_and_an_extra_section():
    data = params_to_dict(params_from_dict(tiny_params_dict()))
    with pytest.raises(ConfigError, match=r"'distill'.*missing \['student'\]"):
        params_for_stage("distill", {s: data[s] for s in ("seed", "dataset", "distill", "store")})
    with pytest.raises(ConfigError, match=r"not its own \['mil'\]"):
        params_for_stage("gate", {"deploy": data["deploy"], "mil": data["mil"]})


def _stage_of(component) -> str:
    name = component.name.replace("-", "_")
    return {"distill_job": "distill"}.get(name, name)  # the job runs `efcm distill`


def test_each_component_takes_exactly_its_stage_sections():
    """The KFP components and dvc.yaml (rendered from the same table) cannot drift apart."""
    for component in c.ALL:
        stage = _stage_of(component)
        sig = inspect.signature(component.python_func)
        given = {n for n, p in sig.parameters.items() if p.annotation is dict or n == "seed"} - {
            "gpu_node_selector"
        }
        if stage not in STAGE_SECTIONS:
            assert not given, f"{component.name} takes params {given} but has no stage entry"
            continue
        assert given == set(STAGE_SECTIONS[stage]), component.name


def test_dvc_yaml_is_rendered_from_the_tables():
    from pipelines.render_dvc import render

    assert (ROOT / "dvc.yaml").read_text() == render(), (
        "dvc.yaml is stale: run python pipelines/render_dvc.py"
    )
    stages = yaml.safe_load(render())["stages"]
    for name in registry.NAMES:
        assert f"strategy_{name}" in stages
        assert stages[f"strategy_{name}"]["params"] == list(STAGE_SECTIONS["strategy"])


def test_no_strategy_or_row_name_is_spelled_outside_the_registry():
    """Strategy names appear as string literals only in efcm/registry.py (and docstrings)."""
    import ast

    offenders = []
    roots = [ROOT / "src" / "efcm", ROOT / "components", ROOT / "pipelines"]
    for path in (p for r in roots for p in r.rglob("*.py")):
        if path.name == "registry.py":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {
            id(n.body[0].value)
            for n in ast.walk(tree)
            if isinstance(n, ast.Module | ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef)
            and n.body
            and isinstance(n.body[0], ast.Expr)
            and isinstance(n.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and node.value in registry.NAMES
                and id(node) not in docstrings
            ):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert not offenders, offenders
