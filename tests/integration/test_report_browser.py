"""The run's HTML report, loaded in a real headless browser (Debian's chromium): the DOM chromium
builds from the page must hold each part of the audit (gate verdict and rule, the comparison
table with the paired deltas, an SVG ROC per row, the efficiency figures, the distillation note)
above the attention heatmaps and the patching QC; and a screenshot of it is taken.

Chromium is required, not optional: a missing browser fails the test with what to install.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest

from efcm.config import PatchParams
from efcm.evaluation.metrics import roc_points
from efcm.evaluation.report import html_report
from efcm.io.manifest import SlideEntry
from efcm.io.results import write_predictions
from efcm.io.status import write_status
from efcm.slides.batch import patch_slide
from efcm.slides.patching import read_coords
from efcm.slides.synthetic import SlideSpec, write_slide

pytestmark = pytest.mark.integration

CLASSES = ("normal", "tumour")
ROWS = ("teacher", "student.vfd.retrain", "student.vfd.etc")
LEFT_OUT = "reuse needs a student in the <teacher-space> (VFD, FPD) & got mcm"
RULE = (
    "promote when the paired delta AUC interval's lower bound >= -deploy.max_auc_drop (0.05) "
    "and student AUC > deploy.min_auc (0.5)"
)
REASON = "student.vfd.retrain: delta AUC interval low -0.061 < -0.05 (teacher 0.950)"


# --- a minimal DOM of chromium's serialisation (the standard library has no DOM parser) ---

VOID = {"br", "img", "meta", "hr", "input", "link", "col", "wbr", "source", "area", "base"}


class Node:
    def __init__(self, tag: str, attrs: dict[str, str], parent: Node | None) -> None:
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list[Node | str] = []

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def iter(self):
        yield self
        for c in self.children:
            if isinstance(c, Node):
                yield from c.iter()

    def find_all(self, tag: str, **attrs: str) -> list[Node]:
        def match(n: Node) -> bool:
            return all(
                v in n.attrs.get(k.rstrip("_"), "").split()
                if k == "class_"
                else n.attrs.get(k) == v
                for k, v in attrs.items()
            )

        return [n for n in self.iter() if n.tag == tag and match(n)]

    def find(self, tag: str, **attrs: str) -> Node:
        found = self.find_all(tag, **attrs)
        assert found, f"no <{tag}> with {attrs} in the page"
        return found[0]


class _Builder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = self.cur = Node("#document", {}, None)

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: v or "" for k, v in attrs}, self.cur)
        self.cur.children.append(node)
        if tag not in VOID:
            self.cur = node

    def handle_startendtag(self, tag, attrs):
        self.cur.children.append(Node(tag, {k: v or "" for k, v in attrs}, self.cur))

    def handle_endtag(self, tag):
        node = self.cur
        while node.parent is not None and node.tag != tag:
            node = node.parent
        if node.parent is not None:
            self.cur = node.parent

    def handle_data(self, data):
        self.cur.children.append(data)


def parse(markup: str) -> Node:
    b = _Builder()
    b.feed(markup)
    return b.root


# --- the browser ---


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(
        "chromium is not installed: the HTML report is checked in a real headless browser. "
        "Install it (Debian: `apt-get install -y chromium`; scripts/test.sh does this as root)."
    )


def browse(page: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        f"--user-data-dir={profile}",
        *extra,
        page.resolve().as_uri(),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, f"{' '.join(cmd)} failed: {done.stderr[-2000:]}"
    return done


def dump_dom(page: Path, profile: Path) -> Node:
    return parse(browse(page, profile, "--dump-dom").stdout)


# --- a small, realistic run ---


def make_patches_and_mil(root: Path) -> tuple[Path, Path]:
    """Four synthetic slides patched for real, and a MIL output dir with out-of-fold predictions
    and attention for them (attention = darkness rank: any per-patch score will do)."""
    patches, mil = root / "patch", root / "mil"
    p64 = PatchParams(target_mpp=1.0, patch_size=64, step=64)
    rows, preds, attention = [], [], {}
    for i, (sid, label) in enumerate([("n1", 0), ("n2", 0), ("t1", 1), ("t2", 1)]):
        slide = root / "slides" / f"{sid}.tif"
        write_slide(slide, SlideSpec(1024, 1024, tumour=bool(label), seed=i))
        rows.append(
            patch_slide(SlideEntry(sid, f"c{i}", str(slide), CLASSES[label]), root, patches, p64)
        )
        n = len(read_coords(patches / "patches" / f"{sid}.h5").coords)
        attention[sid] = np.random.default_rng(i).random(n).astype(np.float32)
        p = 0.2 + 0.6 * label + 0.05 * i
        preds.append(
            {"slide_id": sid, "fold": i % 2, "label": label, "prob_normal": 1 - p, "prob_tumour": p}
        )
    write_status(patches / "status.csv", rows)
    mil.mkdir(parents=True)
    write_predictions(mil, preds, attention)
    return patches, mil


def _row(values: dict[str, float], n: int = 24, n_cases: int = 12) -> dict:
    row: dict = {"n": n, "n_cases": n_cases, "bootstrap": 1000, "bootstrap_dropped": 3}
    for k, (v, lo, hi) in values.items():
        row.update({k: v, f"{k}_ci_low": lo, f"{k}_ci_high": hi})
    return row


def make_evaluation(root: Path) -> Path:
    """metrics.json, roc/<row>.csv, efficiency.json and strategies.json as `efcm evaluate` writes
    them, for 24 slides of 12 patients."""
    ev = root / "evaluate"
    (ev / "roc").mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 12)
    efficiency = {
        "teacher": {"params": 21609216, "gflops_per_patch": 2.1983, "patches_per_s": 99.48,
                    "input_size": 224, "batch_size": 64, "device": "cuda", "peak_memory_mb": 812.5},
        "student": {"params": 11373504, "gflops_per_patch": 0.9701, "patches_per_s": 203.62,
                    "input_size": 224, "batch_size": 64, "device": "cuda", "peak_memory_mb": 301.0},
        "student_teacher_speedup": 2.047, "param_ratio": 1.9, "flop_ratio": 2.266,
    }  # fmt: skip
    metrics: dict = {
        "teacher": _row(
            {"acc": (0.917, 0.792, 1.0), "balanced_acc": (0.917, 0.8, 1.0),
             "auc": (0.950, 0.861, 1.0), "f1": (0.916, 0.79, 1.0)}
        ),
        "student.vfd.retrain": _row(
            {"acc": (0.875, 0.75, 1.0), "balanced_acc": (0.875, 0.74, 1.0),
             "auc": (0.938, 0.84, 1.0), "f1": (0.874, 0.73, 1.0),
             "delta_auc": (-0.012, -0.061, 0.030), "delta_balanced_acc": (-0.042, -0.125, 0.042),
             "delta_f1": (-0.042, -0.127, 0.043)}
        ),
        "student.vfd.etc": _row(
            {"acc": (0.708, 0.54, 0.875), "balanced_acc": (0.708, 0.55, 0.87),
             "auc": (0.771, 0.58, 0.93), "f1": (0.70, 0.52, 0.87),
             "delta_auc": (-0.179, -0.33, -0.05), "delta_balanced_acc": (-0.209, -0.375, -0.042),
             "delta_f1": (-0.216, -0.39, -0.04)}
        ),
        # what `efcm evaluate` puts there: the ratios (the profiles are in efficiency.json)
        "efficiency": {k: v for k, v in efficiency.items() if k.endswith(("speedup", "ratio"))},
    }  # fmt: skip
    metrics["teacher"]["localisation_auroc"] = 0.912
    for name, noise in zip(ROWS, (0.25, 0.3, 0.45), strict=True):
        p = np.clip(labels * 0.5 + 0.25 + rng.normal(0, noise, len(labels)), 0, 1)
        points = roc_points(np.stack([1 - p, p], 1), labels, positive=1)
        with open(ev / "roc" / f"{name}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["fpr", "tpr", "threshold"])
            w.writeheader()
            w.writerows(points)
    (ev / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (ev / "efficiency.json").write_text(json.dumps(efficiency, indent=2))
    (ev / "strategies.json").write_text(
        json.dumps({"run": ["retrain", "etc"], "left_out": {"reuse": LEFT_OUT}})
    )
    return ev


def make_gate(root: Path) -> Path:
    gate = root / "gate"
    gate.mkdir()
    decision = {
        "promote": False, "strategy": "retrain", "row": "student.vfd.retrain",
        "student_auc": 0.938, "teacher_auc": 0.950, "delta_auc": -0.012,
        "delta_auc_ci_low": -0.061, "delta_auc_ci_high": 0.030, "max_auc_drop": 0.05,
        "min_auc": 0.5, "reason": REASON, "rule": RULE,
    }  # fmt: skip
    (gate / "decision.json").write_text(json.dumps(decision, indent=2))
    return gate


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("report_run")
    patches, mil = make_patches_and_mil(root)
    evaluation, gate = make_evaluation(root), make_gate(root)
    page = html_report(
        patches, mil, root / "report.html", CLASSES, evaluation_dir=evaluation, gate_dir=gate
    )
    return {"root": root, "page": page, "evaluation": evaluation, "dom": dump_dom(page, root / "p")}


def test_the_audit_comes_above_the_heatmaps_and_qc_in_order(run):
    ids = [h.attrs.get("id") for h in run["dom"].find_all("h2")]
    assert ids == ["gate", "comparison", "roc", "efficiency", "distillation-data", "heatmaps", "qc"]


def test_gate_shows_the_verdict_the_reason_and_the_rule(run):
    dom = run["dom"]
    assert dom.find("div", class_="verdict").text() == "NOT PROMOTED"
    assert "fail" in dom.find("div", class_="verdict").attrs["class"]
    assert dom.find("span", class_="rule").text() == RULE
    assert REASON in dom.find("p", class_="reason").text()
    gate = dom.find("table", class_="gate").text()
    assert "student.vfd.retrain" in gate and "-0.012 [-0.061, +0.030]" in gate


def test_comparison_table_has_every_row_with_its_intervals_and_paired_deltas(run):
    table = run["dom"].find("table", class_="comparison")
    rows = {tr.attrs["data-row"]: tr for tr in table.find_all("tr") if "data-row" in tr.attrs}
    assert list(rows) == list(ROWS)
    assert "(exported)" in rows["student.vfd.retrain"].find("td").text()
    assert "0.950[0.861, 1.000]" in rows["teacher"].text()  # AUC and its interval
    assert [td.text() for td in rows["teacher"].find_all("td")].count("reference") == 3
    retrain = rows["student.vfd.retrain"].find_all("td", class_="delta")
    assert [td.text() for td in retrain] == [
        "-0.012[-0.061, +0.030]",
        "-0.042[-0.125, +0.042]",
        "-0.042[-0.127, +0.043]",
    ]
    assert all("tie" in td.attrs["class"] for td in retrain)  # the intervals contain 0
    etc = rows["student.vfd.etc"].find_all("td", class_="delta")
    assert len(etc) == 3 and all("worse" in td.attrs["class"] for td in etc)
    assert "1000 (3 dropped)" in rows["teacher"].text()


def test_strategy_left_out_is_shown_escaped(run):
    dom = run["dom"]
    assert LEFT_OUT in dom.text()  # the <teacher-space> of the reason is text, not an element
    assert not dom.find_all("teacher-space")


def test_every_row_has_an_svg_roc_plot_with_its_curve(run):
    dom = run["dom"]
    figures = {f.attrs["data-row"]: f for f in dom.find_all("figure", class_="roc")}
    assert list(figures) == list(ROWS)
    for name, fig in figures.items():
        svg = fig.find("svg")
        lines = svg.find_all("polyline", class_="roc")
        assert len(lines) == (1 if name == "teacher" else 2)  # students: + the teacher, dashed
        with open(run["evaluation"] / "roc" / f"{name}.csv", newline="") as f:
            n_points = sum(1 for _ in csv.DictReader(f))
        own = lines[-1].attrs["points"].split()
        assert len(own) == n_points
        frame = svg.find("rect")
        x0, y0 = float(frame.attrs["x"]), float(frame.attrs["y"])
        side = float(frame.attrs["width"])
        xy = np.array([p.split(",") for p in own], float)
        assert xy[0].tolist() == [x0, y0 + side]  # (fpr 0, tpr 0): lower left
        assert xy[-1].tolist() == [x0, y0 + side] or xy[-1].tolist() == [x0 + side, y0]
        assert ((xy >= [x0, y0]) & (xy <= [x0 + side, y0 + side])).all()
        assert "AUC" in fig.find("figcaption").text()


def test_efficiency_figures_and_ratios(run):
    dom = run["dom"]
    rows = [
        [td.text() for td in tr.find_all("td")]
        for tr in dom.find("table", class_="efficiency").find_all("tr")
    ]
    rows = [r for r in rows if r]
    assert rows[0][:4] == ["teacher", "21.61 M", "2.198", "99.5"]
    assert rows[1][:4] == ["student", "11.37 M", "0.970", "203.6"]
    assert rows[0][-1] == "812.5"  # peak memory, measured on CUDA
    ratios = dom.find("p", class_="ratios").text()
    assert "2.047x the patches/s" in ratios and "2.266x fewer GFLOPs" in ratios


def test_distillation_note_says_test_folds_were_seen_and_why_that_is_not_leakage(run):
    note = run["dom"].find("p", class_="note").text()
    assert "test folds included" in note and "not label leakage" in note


def test_heatmaps_and_qc_are_still_drawn(run):
    dom = run["dom"]
    body = dom.find("body")
    h2s = body.find_all("h2")
    assert [h.attrs["id"] for h in h2s][-2:] == ["heatmaps", "qc"]
    images = [img for img in dom.find_all("img") if img.attrs["src"].startswith("data:image/png")]
    assert len(images) == 4 + 4  # a heatmap and a QC thumbnail per slide
    assert "t2: label tumour" in dom.text()  # the most tumour-like slide's heatmap caption


def test_page_is_self_contained(run):
    dom = run["dom"]
    assert not dom.find_all("script") and not dom.find_all("link") and not dom.find_all("iframe")
    assert all(img.attrs["src"].startswith("data:") for img in dom.find_all("img"))
    assert all(a.attrs["href"].startswith("#") for a in dom.find_all("a"))


def test_missing_parts_say_not_available(tmp_path: Path, run):
    ev = tmp_path / "evaluate"
    ev.mkdir()
    metrics = json.loads((run["evaluation"] / "metrics.json").read_text())
    del metrics["efficiency"], metrics["student.vfd.etc"]["auc"]  # and no efficiency.json
    (ev / "metrics.json").write_text(json.dumps(metrics))
    shutil.copytree(run["evaluation"] / "roc", ev / "roc")
    (ev / "roc" / "student.vfd.etc.csv").unlink()
    root = run["root"]
    page = html_report(
        root / "patch", root / "mil", tmp_path / "r.html", CLASSES, evaluation_dir=ev
    )
    dom = dump_dom(page, tmp_path / "p")
    assert "no gate directory was given" in dom.find("div", id="gate-body").text()
    figures = {f.attrs["data-row"]: f for f in dom.find_all("figure", class_="roc")}
    assert not figures["student.vfd.etc"].find_all("svg")
    assert "not available" in figures["student.vfd.etc"].text()
    assert figures["teacher"].find_all("polyline")
    assert "not available" in dom.find("div", id="efficiency-body").text()
    assert "strategies.json is absent" in dom.text()
    assert dom.find_all("img")  # the heatmaps and QC still render


def test_screenshot_is_taken_and_not_blank(run):
    shot = run["root"] / "report.png"
    browse(run["page"], run["root"] / "p", f"--screenshot={shot}", "--window-size=1280,2000")
    img = cv2.imread(str(shot))
    assert img is not None and img.shape[:2] == (2000, 1280)
    assert img.std() > 10  # text, tables and plots, not an empty page
