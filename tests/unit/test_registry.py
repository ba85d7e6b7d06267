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
    """Strategy names (slide and image) appear as string literals only in efcm/registry.py (and
    docstrings)."""
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
                and node.value in (*registry.NAMES, *registry.IMAGE_NAMES)
                and id(node) not in docstrings
            ):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert not offenders, offenders


def _image_with(method: str, strategies, export: str = "retrain") -> dict:
    raw = tiny_params_dict()
    raw["distill"] = {**raw["distill"], "method": method}
    raw["image"] = {**raw["image"], "strategies": strategies, "export_strategy": export}
    return raw


def test_image_strategies_auto_leaves_out_what_cannot_run_and_says_why():
    run, left_out = registry.resolve_image("vfd", "auto")
    unavailable = [n for n, e in registry.IMAGE_STRATEGIES.items() if not e.available]
    assert run == [n for n in registry.IMAGE_NAMES if n not in unavailable]
    for name in unavailable:  # e.g. end-to-end fine-tuning until its core function lands
        assert "not available yet" in left_out[name]
        with pytest.raises(ConfigError, match=rf"image\.strategies includes '{name}'.*available"):
            params_from_dict(_image_with("vfd", [name]))
    run, left_out = registry.resolve_image("fpd", "auto")
    teacher_space = [n for n, e in registry.IMAGE_STRATEGIES.items() if e.needs_teacher_space]
    assert teacher_space and set(teacher_space) <= set(run)


def test_image_reuse_needs_a_student_in_the_teachers_space():
    teacher_space = next(n for n, e in registry.IMAGE_STRATEGIES.items() if e.needs_teacher_space)
    params_from_dict(_image_with("vfd", [teacher_space], export=teacher_space))
    # MCM-KD is refused for images by distillation; the table says why reuse could not follow
    _, left_out = registry.resolve_image("mcm", "auto")
    assert "teacher's feature space" in left_out[teacher_space]
    with pytest.raises(ConfigError, match=r"image\.export_strategy .* is not one of"):
        params_from_dict(_image_with("mcm", "auto", export=teacher_space))
    with pytest.raises(ConfigError, match=r"unknown image strategies \['bogus'\]"):
        params_from_dict(_image_with("vfd", ["bogus"]))


def test_image_dvc_yaml_is_rendered_from_the_tables():
    from pipelines.render_dvc import IMAGE_DIR, render

    assert (IMAGE_DIR / "dvc.yaml").read_text() == render(image=True), (
        "pipelines/image/dvc.yaml is stale: run python pipelines/render_dvc.py --image"
    )
    stages = yaml.safe_load(render(image=True))["stages"]
    slides = yaml.safe_load(render())["stages"]
    available = [n for n, e in registry.IMAGE_STRATEGIES.items() if e.available]
    assert [s for s in stages if s.startswith("strategy_")] == [f"strategy_{n}" for n in available]
    shared = {"demo_data", "extract_teacher", "distill", "extract_student", "splits",
              "train_mil_teacher", "evaluate", "export", "gate"}  # fmt: skip
    assert shared | {f"strategy_{n}" for n in available} == set(stages)
    assert shared <= set(slides)  # the same names as the slide pipeline's stages
    for name, stage in stages.items():
        if name != "demo_data":
            assert "--kind image" in stage["cmd"] or name == "gate", name
        # the gate judges a package of either kind: the slide stage's sections
        prefix = "" if name == "gate" else "image_"
        section = next(k for k, v in STAGE_SECTIONS.items() if k.startswith(prefix)
                       and list(v) == stage["params"])  # fmt: skip
        assert section, name
    assert stages["gate"]["cmd"].startswith("efcm gate --package runs/package")
    assert "report" not in stages  # no HTML report for images yet
