"""The evaluation half of the HTML report (`efcm.evaluation.report`): the promotion gate's verdict
and rule, the teacher vs student table with the paired deltas, the ROC curves, the efficiency
figures, and what the distillation saw.

It reads what `efcm evaluate` and `efcm gate` write:
- evaluation dir: `metrics.json` (`{row: {...}, "efficiency": {...}}`, a row being `teacher` or
  `student.<method>.<strategy>`), `roc/<row>.csv` (fpr, tpr, threshold), `efficiency.json` and,
  where present, `strategies.json` (`{"run": [...], "left_out": {strategy: reason}}`);
- gate dir: `decision.json` (promote, row, student/teacher AUC, the paired delta AUC and its
  interval, the thresholds, reason, rule).

A file or field that is absent or unreadable shows as "not available" with the reason: the page is
the audit of a run, so it must render whatever part of the run exists, and say what is missing.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from efcm.evaluation.efficiency import RATIOS
from efcm.evaluation.report_svg import Curve, read_roc, roc_svg
from efcm.registry import TEACHER_ROW, is_student_row

METRICS = (("acc", "ACC"), ("balanced_acc", "balanced ACC"), ("auc", "AUC"), ("f1", "macro-F1"))
DELTAS = (("auc", "AUC"), ("balanced_acc", "balanced ACC"), ("f1", "macro-F1"))
TEACHER = TEACHER_ROW
_STUDENT_COLOUR, _TEACHER_COLOUR = "#1f5fb4", "#555555"

STYLE = (
    ".na{color:#888;font-style:italic}.ci{color:#555;font-size:11px}"
    ".num{text-align:right;white-space:nowrap}"
    ".better{background:#e3f4e3}.worse{background:#fbe3e3}.tie{background:#f3f3f3}"
    "tr.exported td:first-child{font-weight:bold}"
    ".verdict{padding:8px 12px;border-radius:4px;font-size:18px;font-weight:bold;"
    "display:inline-block}"
    ".verdict.pass{background:#d8f0d8;color:#1b5e20}.verdict.fail{background:#f8d7d7;color:#8b1a1a}"
    ".verdict.unknown{background:#eee;color:#555}"
    "table.gate th{text-align:left}.rule{font-family:monospace;background:#f6f6f6;padding:4px 8px}"
    ".note{max-width:900px;line-height:1.4}"
)

LEAKAGE_NOTE = (
    "<p class='note'>Distillation trained the student on the tissue patches of <b>every</b> slide "
    "of the manifest, the slides of the test folds included (a few slides are held back only to "
    "measure how closely the student matches the teacher). Its only target is the frozen "
    "teacher's feature of the same patch, so it learns from unlabelled pixels. This is not label "
    "leakage: no slide label, case outcome or tumour mask enters the distillation loss, and the "
    "teacher is fixed (pretrained elsewhere). Every step that uses labels (the CLAM heads, the "
    "information-bottleneck selection and the end-to-end fine-tuning of ETC) is fitted per fold on "
    "that fold's training slides, and every figure above is out-of-fold. It is the transductive, "
    "self-supervised use of a site's own unlabelled archive, which a deployment can repeat on new "
    "slides before any label exists. What it does mean is that the student's features were fitted "
    "to the pixel distribution of the evaluated slides: an estimate for slides never seen in any "
    "form needs distillation on the training folds only.</p>"
)


def _e(value: Any) -> str:
    return html.escape(str(value))


def _na(why: str = "") -> str:
    return f"<span class='na'>not available{': ' + _e(why) if why else ''}</span>"


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _num(v: Any, fmt: str = ".3f") -> str:
    return _e(format(v, fmt)) if _finite(v) else _na()


def _load_json(path: Path) -> tuple[Any, str]:
    """(the parsed file, "") or (None, why it is not available)."""
    if not path.is_file():
        return None, f"{path.name} is absent"
    try:
        return json.loads(path.read_text()), ""
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, f"{path.name} is unreadable ({err})"


def _rows(metrics: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The teacher first, then the student rows in file order."""
    rows = [
        (k, v)
        for k, v in metrics.items()
        if isinstance(v, dict) and (k == TEACHER or is_student_row(k))
    ]
    return sorted(rows, key=lambda kv: kv[0] != TEACHER)


def _interval_cell(m: dict[str, Any], key: str, fmt: str = ".3f") -> str:
    value, lo, hi = m.get(key), m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
    if not _finite(value):
        return f"<td class='num'>{_na()}</td>"
    ci = f"[{format(lo, fmt)}, {format(hi, fmt)}]" if _finite(lo) and _finite(hi) else "CI n/a"
    return f"<td class='num'>{_e(format(value, fmt))}<br><span class='ci'>{_e(ci)}</span></td>"


def _delta_cell(m: dict[str, Any], metric: str) -> str:
    """Student minus teacher; green when the whole interval is above 0, red when below."""
    key = f"delta_{metric}"
    lo, hi = m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
    cell = _interval_cell(m, key, "+.3f")
    if _finite(lo) and _finite(hi):
        kind = "better" if lo > 0 else "worse" if hi < 0 else "tie"
        cell = cell.replace("<td class='num'>", f"<td class='num delta {kind}'>", 1)
    return cell


def _resamples(m: dict[str, Any]) -> str:
    n, dropped = m.get("bootstrap"), m.get("bootstrap_dropped")
    if not _finite(n):
        return _na()
    return _e(f"{n:g}" + (f" ({dropped:g} dropped)" if _finite(dropped) and dropped else ""))


def comparison_table(metrics: dict[str, Any], exported: str | None) -> str:
    """One row per model: slides, cases, each metric with its interval, the paired deltas."""
    rows = _rows(metrics)
    if not rows:
        return f"<p>{_na('metrics.json has no teacher or student row')}</p>"
    head = ["model", "slides", "cases", "resamples"] + [label for _, label in METRICS]
    head += [f"&Delta; {label}" for _, label in DELTAS] + ["attention localisation AUROC"]
    out = ["<table class='comparison'><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for name, m in rows:
        mark = " <small>(exported)</small>" if name == exported else ""
        cls = " class='exported'" if name == exported else ""
        cells = [f"<td>{_e(name)}{mark}</td>"]
        cells += [f"<td class='num'>{_num(m.get(k), 'g')}</td>" for k in ("n", "n_cases")]
        cells.append(f"<td class='num'>{_resamples(m)}</td>")
        cells += [_interval_cell(m, k) for k, _ in METRICS]
        if name == TEACHER:
            cells += ["<td class='num'>reference</td>"] * len(DELTAS)
        else:
            cells += [_delta_cell(m, k) for k, _ in DELTAS]
        cells.append(f"<td class='num'>{_num(m.get('localisation_auroc'))}</td>")
        out.append(f"<tr{cls} data-row='{_e(name)}'>{''.join(cells)}</tr>")
    out.append("</table>")
    return "".join(out)


def strategies_note(eval_dir: Path) -> str:
    data, why = _load_json(eval_dir / "strategies.json")
    if not isinstance(data, dict):
        return f"<p>Strategies: {_na(why or 'strategies.json is not an object')}</p>"
    run = data.get("run")
    ran = ", ".join(_e(s) for s in run) if isinstance(run, list) and run else _na()
    left = data.get("left_out")
    out = f"<p>Strategies run: {ran}.</p>"
    if isinstance(left, dict) and left:
        items = "".join(f"<li>{_e(k)}: {_e(v)}</li>" for k, v in left.items())
        out += f"<p>Left out:</p><ul>{items}</ul>"
    return out


def roc_section(eval_dir: Path, metrics: dict[str, Any], positive: str) -> str:
    """One plot per row; each student plot carries the teacher's curve, dashed, for reference."""
    curves: dict[str, tuple[list[float], list[float]] | str] = {}
    for name, _ in _rows(metrics):
        if Path(name).name != name or name.startswith("."):
            curves[name] = "not a plain file name"  # a row name never reaches outside roc/
            continue
        try:
            curves[name] = read_roc(eval_dir / "roc" / f"{name}.csv")
        except (OSError, UnicodeDecodeError, ValueError) as err:
            curves[name] = str(err) if isinstance(err, ValueError) else f"roc/{name}.csv: {err}"
    teacher = curves.get(TEACHER)
    teacher_auc = metrics.get(TEACHER, {}).get("auc")
    figs = []
    for name, points in curves.items():
        auc = metrics[name].get("auc")
        caption = f"<figcaption>{_e(name)}: AUC {_num(auc)}</figcaption>"
        if isinstance(points, str):
            figs.append(
                f"<figure class='roc' data-row='{_e(name)}'>{_na(points)}{caption}</figure>"
            )
            continue
        own = Curve(
            f"{'teacher' if name == TEACHER else 'student'} AUC {_fmt(auc)}",
            *points,
            _TEACHER_COLOUR if name == TEACHER else _STUDENT_COLOUR,
        )
        lines = [own]
        if name != TEACHER and not isinstance(teacher, str) and teacher is not None:
            lines.insert(0, Curve(f"teacher AUC {_fmt(teacher_auc)}", *teacher, "#888", True))
        svg = roc_svg(lines, f"ROC of {name} ({positive} vs rest)")
        figs.append(f"<figure class='roc' data-row='{_e(name)}'>{svg}{caption}</figure>")
    return (
        f"<p>Out-of-fold ROC, {_e(positive)} against the rest; each student plot has the "
        f"teacher's curve dashed.</p><div class='grid'>{''.join(figs)}</div>"
    )


def _fmt(v: Any) -> str:
    return format(v, ".3f") if _finite(v) else "n/a"


def gate_section(gate_dir: Path | None) -> tuple[str, str | None]:
    """(the section's HTML, the exported row the gate judged, or None)."""
    if gate_dir is None:
        return f"<p>{_na('no gate directory was given')}</p>", None
    d, why = _load_json(gate_dir / "decision.json")
    if not isinstance(d, dict):
        return f"<p>{_na(why or 'decision.json is not an object')}</p>", None
    promote = d.get("promote")
    if isinstance(promote, bool):
        verdict = (
            "<div class='verdict pass'>PROMOTED</div>"
            if promote
            else "<div class='verdict fail'>NOT PROMOTED</div>"
        )
    else:
        verdict = f"<div class='verdict unknown'>verdict {_na('no promote flag')}</div>"
    row = d.get("row", d.get("student"))  # `student`: decision.json before the paired gate
    rule = d.get("rule")
    delta = f"{_num(d.get('delta_auc'), '+.3f')}"
    lo, hi = d.get("delta_auc_ci_low"), d.get("delta_auc_ci_high")
    if _finite(lo) and _finite(hi):
        delta += f" [{_e(format(lo, '+.3f'))}, {_e(format(hi, '+.3f'))}]"
    facts = [
        ("exported model", _e(row) if row else _na()),
        ("strategy", _e(d["strategy"]) if d.get("strategy") else _na()),
        ("student AUC", _num(d.get("student_auc"))),
        ("teacher AUC", _num(d.get("teacher_auc"))),
        ("paired &Delta; AUC [interval]", delta),
        ("max AUC drop (deploy.max_auc_drop)", _num(d.get("max_auc_drop"), "g")),
        ("min AUC (deploy.min_auc)", _num(d.get("min_auc"), "g")),
    ]
    table = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in facts)
    reason = _e(d["reason"]) if d.get("reason") else _na()
    rule_html = (
        f"<span class='rule'>{_e(rule)}</span>" if rule else _na("decision.json has no rule")
    )
    body = (
        f"{verdict}<p class='reason'>Reason: {reason}</p><p>Rule: {rule_html}</p>"
        f"<table class='gate'>{table}</table>"
    )
    return body, row if isinstance(row, str) else None


def efficiency_section(efficiency: Any) -> str:
    """Teacher and student cost per patch, measured in one run (`evaluation.efficiency.compare`)."""
    if not isinstance(efficiency, dict):
        return f"<p>{_na('no efficiency figures in metrics.json or efficiency.json')}</p>"
    profiles = [
        (k, efficiency[k]) for k in ("teacher", "student") if isinstance(efficiency.get(k), dict)
    ]
    head = ["model", "params", "GFLOPs / patch", "patches / s", "input", "batch", "device"]
    memory = any("peak_memory_mb" in p for _, p in profiles)
    head += ["peak memory (MB)"] if memory else []
    rows = []
    for name, p in profiles:
        params = p.get("params")
        cells = [
            _e(name),
            _e(f"{params / 1e6:.2f} M") if _finite(params) else _na(),
            _num(p.get("gflops_per_patch")),
            _num(p.get("patches_per_s"), ".1f"),
            _e(f"{p['input_size']} px") if _finite(p.get("input_size")) else _na(),
            _num(p.get("batch_size"), "g"),
            _e(p["device"]) if p.get("device") else _na(),
        ]
        cells += [_num(p.get("peak_memory_mb"), ".1f")] if memory else []
        rows.append("<tr>" + "".join(f"<td class='num'>{c}</td>" for c in cells) + "</tr>")
    ths = "".join(f"<th>{h}</th>" for h in head)
    table = f"<table class='efficiency'><tr>{ths}</tr>{''.join(rows)}</table>" if rows else ""
    ratios = [f"{_num(efficiency.get(key), 'g')}x {what}" for key, what in RATIOS]
    return (
        f"{table}<p class='ratios'>Student vs teacher: {', '.join(ratios)} (measured in one run "
        "on the device shown: the ratios mean something on a shared machine, absolute speeds "
        "only on the production accelerator).</p>"
    )


def _efficiency(eval_dir: Path, metrics: Any) -> dict[str, Any] | None:
    """efficiency.json (the teacher and student profiles and the ratios), completed by the
    `efficiency` entry of metrics.json (which may hold only the ratios); None when neither has
    any."""
    from_file, _ = _load_json(eval_dir / "efficiency.json")
    from_metrics = metrics.get("efficiency") if isinstance(metrics, dict) else None
    parts = [d for d in (from_metrics, from_file) if isinstance(d, dict)]
    return {k: v for d in parts for k, v in d.items()} if parts else None


def evaluation_sections(
    evaluation_dir: str | Path | None, gate_dir: str | Path | None, positive: str
) -> str:
    """The page's upper half: gate, comparison, ROC, efficiency, the distillation note; each an
    `<h2 id=ID>` and a `<div id=ID-body>`."""
    gate_html, exported = gate_section(Path(gate_dir) if gate_dir is not None else None)
    metrics, efficiency, why = None, None, "no evaluation directory was given"
    if evaluation_dir is not None:
        eval_dir = Path(evaluation_dir)
        metrics, why = _load_json(eval_dir / "metrics.json")
        if metrics is not None and not isinstance(metrics, dict):
            metrics, why = None, "metrics.json is not an object"
        efficiency = _efficiency(eval_dir, metrics)
    if metrics is None:
        comparison = roc = f"<p>{_na(why)}</p>"
    else:
        comparison = (
            "<p>Slide-level metrics of the out-of-fold predictions (the same patient-level folds "
            "for every row); below each value its bootstrap interval over patients. &Delta; is "
            "student minus teacher on the same resamples (paired): green when the whole interval "
            "is above 0, red when below, grey when it contains 0.</p>"
            + comparison_table(metrics, exported)
            + strategies_note(eval_dir)
        )
        roc = roc_section(eval_dir, metrics, positive)
    sections = (
        ("gate", "Promotion gate", gate_html),
        ("comparison", "Teacher vs students", comparison),
        ("roc", "ROC curves", roc),
        ("efficiency", "Efficiency", efficiency_section(efficiency)),
        ("distillation-data", "What the distillation saw", LEAKAGE_NOTE),
    )
    return "".join(f"<h2 id='{i}'>{t}</h2><div id='{i}-body'>{b}</div>" for i, t, b in sections)
