"""The core never imports kfp or dvc; only the serving and deploy adapters import kserve
(DESIGN.md section 2), the deploy adapter only in its SDK shim (efcm.deploy._kserve_sdk)."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "efcm"
DEPLOY_SDK_SHIM = Path("deploy", "_kserve_sdk.py")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_core_imports_no_orchestration_and_kserve_only_in_the_adapters():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 10
    offenders = []
    for f in files:
        rel = f.relative_to(SRC)
        names = _imports(f)
        if names & {"kfp", "dvc"}:
            offenders.append(f"{rel}: imports {sorted(names & {'kfp', 'dvc'})}")
        if "kserve" in names and rel.parts[0] != "serving" and rel != DEPLOY_SDK_SHIM:
            offenders.append(f"{rel}: imports kserve outside efcm/serving and {DEPLOY_SDK_SHIM}")
    assert not offenders, offenders


def test_the_walker_sees_nested_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    import kfp.dsl\n    from dvc import api\n")
    assert _imports(f) == {"kfp", "dvc"}
