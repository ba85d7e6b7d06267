"""The import rules of the core (DESIGN.md section 2, the README's architecture section).

- The core never imports kfp or dvc; only the serving adapter imports kserve, and the deploy
  adapter in its SDK shim.
- Dependencies point one way: adapters -> stages -> inference -> training, evaluation ->
  runtimes -> features -> models -> slides -> io -> base. A module imports only from its own layer
  or a lower one;
  training and evaluation never import each other; the adapters import each other only where
  `ADAPTER_CALLS` says (the CLI starts the server), efcm.images (beside efcm.slides) uses the
  slides' batch loop and efcm.image_features (beside efcm.features) the extraction engine's
  pieces (`LATERAL_CALLS`). No import cycles.

Imports inside functions count: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

# rank, group: the group is a module or a package prefix; higher ranks may import lower ones
LAYERS: list[tuple[int, str]] = [
    (0, "efcm"),  # the package itself (__version__)
    (0, "efcm.errors"),
    (0, "efcm.config"),
    (0, "efcm.registry"),
    (0, "efcm.limits"),
    (0, "efcm.argv"),
    (1, "efcm.io"),
    (2, "efcm.slides"),
    (2, "efcm.images"),
    (3, "efcm.models"),
    (4, "efcm.features"),
    (4, "efcm.image_features"),
    (5, "efcm.runtimes"),
    (6, "efcm.training"),
    (6, "efcm.evaluation"),
    (7, "efcm.inference"),
    (8, "efcm.stages"),
    (9, "efcm.cli"),
    (9, "efcm.serving"),
    (9, "efcm.deploy"),
]
BASE = {g for r, g in LAYERS if r == 0}
ADAPTER_CALLS = {("efcm.cli", "efcm.serving")}
# within a layer, a group may use another only here: the images reuse the slides' batch loop,
# image extraction the extraction engine's pieces
LATERAL_CALLS = ADAPTER_CALLS | {
    ("efcm.images", "efcm.slides"),
    ("efcm.image_features", "efcm.features"),
}
DEPLOY_SDK_SHIM = Path("deploy", "_kserve_sdk.py")  # the deploy adapter's one kserve import


def modules(src: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module under `src`."""
    out = {}
    for f in sorted(src.rglob("*.py")):
        parts = list(f.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def imported(path: Path, name: str, known: set[str]) -> set[str]:
    """The modules of `known` that module `name` (file `path`) imports, anywhere in the file."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join([*pkg, base] if base else pkg)
            # `from pkg import sub` imports the submodule when there is one
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def group_of(module: str) -> tuple[int, str]:
    best = None
    for rank, g in LAYERS:
        if (module == g or module.startswith(g + ".")) and (best is None or len(g) > len(best[1])):
            best = (rank, g)
    if best is None or (best[1] == "efcm" and module != "efcm"):
        raise AssertionError(f"{module}: in no layer; add it to LAYERS in {__file__}")
    return best


def violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for mod, deps in sorted(graph.items()):
        rank, group = group_of(mod)
        for dep in sorted(deps):
            drank, dgroup = group_of(dep)
            if dgroup == group or rank == drank == 0:  # the base modules form one layer
                continue
            if drank > rank or (drank == rank and (group, dgroup) not in LATERAL_CALLS):
                out.append(f"{mod} ({group}, layer {rank}) imports {dep} ({dgroup}, layer {drank})")
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def import_graph(src: Path) -> dict[str, set[str]]:
    mods = modules(src)
    known = set(mods)
    return {m: imported(f, m, known) for m, f in mods.items() if m.startswith("efcm")}


def _external(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_core_imports_no_orchestration_and_kserve_only_in_its_adapters():
    files = sorted((SRC / "efcm").rglob("*.py"))
    assert len(files) > 10
    offenders = []
    for f in files:
        rel = f.relative_to(SRC / "efcm")
        names = _external(f)
        if names & {"kfp", "dvc"}:
            offenders.append(f"{rel}: imports {sorted(names & {'kfp', 'dvc'})}")
        if "kserve" in names and rel.parts[0] != "serving" and rel != DEPLOY_SDK_SHIM:
            offenders.append(f"{rel}: imports kserve outside efcm/serving and {DEPLOY_SDK_SHIM}")
    assert not offenders, offenders


def test_imports_follow_the_layers_and_have_no_cycles():
    graph = import_graph(SRC)
    assert len(graph) > 40 and any(graph.values())
    assert violations(graph) == []
    assert cycles(graph) == []


def test_the_walkers_see_nested_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    import kfp.dsl\n    from dvc import api\n")
    assert _external(f) == {"kfp", "dvc"}


def test_the_layer_check_finds_an_upward_import_and_a_cycle(tmp_path):
    pkg = tmp_path / "efcm"
    for d in ("io", "slides", "serving"):
        (pkg / d).mkdir(parents=True)
        (pkg / d / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    # io reads a slide (upward), slides and io import each other (a cycle), lazily
    (pkg / "io" / "files.py").write_text("def f():\n    from efcm.slides import reader\n")
    (pkg / "slides" / "reader.py").write_text("from ..io.files import f\n")
    (pkg / "serving" / "model.py").write_text("from efcm.slides.reader import f\n")
    graph = import_graph(tmp_path)
    assert graph["efcm.io.files"] == {"efcm.slides.reader"}
    assert graph["efcm.slides.reader"] == {"efcm.io.files"}  # relative import resolved
    assert violations(graph) == [
        "efcm.io.files (efcm.io, layer 1) imports efcm.slides.reader (efcm.slides, layer 2)"
    ]
    assert cycles(graph) == [["efcm.io.files", "efcm.slides.reader"]]


# where the environment may be read: efcm.limits parses every EFCM_* variable, the adapters call it;
# the GCS client reads google's own STORAGE_EMULATOR_HOST (as google-cloud-storage itself does)
ENV_READERS = {"efcm.limits", "efcm.io.gcs"}


def env_reads(src: Path) -> list[str]:
    """`os.environ`, `os.getenv` and `*.from_env(...)` calls in core modules other than
    ENV_READERS and the adapters (layer 9)."""
    out = []
    for name, path in modules(src).items():
        if not name.startswith("efcm") or name in ENV_READERS or group_of(name)[0] == 9:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv"):
                out.append(f"{name}:{node.lineno}: os.{node.attr}")
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "from_env"
            ):
                out.append(f"{name}:{node.lineno}: {ast.unparse(node.func)}()")
    return sorted(out)


def test_only_the_adapters_and_limits_read_the_environment(tmp_path):
    assert env_reads(SRC) == []
    (tmp_path / "efcm" / "io").mkdir(parents=True)
    (tmp_path / "efcm" / "io" / "cache.py").write_text(
        "import os\n\ndef f():\n    return os.environ.get('X')\n\n"
        "class C:\n    @classmethod\n    def from_env(cls):\n        return cls()\n\n"
        "def g():\n    return C.from_env()\n"
    )
    assert env_reads(tmp_path) == ["efcm.io.cache:12: C.from_env()", "efcm.io.cache:4: os.environ"]
