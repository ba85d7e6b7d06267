"""The command line contract: exit codes and one-line errors."""

import json

import pytest
import yaml

from efcm.cli import main


def test_unknown_config_key_exits_2_naming_it(tmp_path, capsys, tiny_dataset):
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump({"patch": {"patch_sise": 64}}))
    code = main(
        [
            "patch",
            "--manifest",
            str(tiny_dataset),
            "--out",
            str(tmp_path / "o"),
            "--params",
            str(bad),
        ]
    )
    assert code == 2
    assert "patch.patch_sise: unknown key" in capsys.readouterr().err


def test_batch_where_every_slide_fails_exits_1(tmp_path, capsys, tiny_params_file):
    (tmp_path / "a.svs").write_bytes(b"")
    m = tmp_path / "m.csv"
    m.write_text("slide_id,case_id,uri,label\na,c,a.svs,normal\n")
    code = main(
        [
            "patch",
            "--manifest",
            str(m),
            "--out",
            str(tmp_path / "o"),
            "--params",
            str(tiny_params_file),
        ]
    )
    assert code == 1
    assert "every slide failed" in capsys.readouterr().err
    assert "empty file" in (tmp_path / "o" / "status.csv").read_text()


def test_batch_with_some_failures_succeeds(tmp_path, tiny_dataset, tiny_params_file):
    lines = tiny_dataset.read_text().splitlines()
    slide = lines[1].split(",")
    m = tmp_path / "m.csv"
    uri = tiny_dataset.parent / slide[2]
    (tmp_path / "bad.svs").write_bytes(b"\0" * 100)
    m.write_text(f"{lines[0]}\n{slide[0]},{slide[1]},{uri},{slide[3]}\nbad,c9,bad.svs,normal\n")
    assert (
        main(
            [
                "patch",
                "--manifest",
                str(m),
                "--out",
                str(tmp_path / "o"),
                "--params",
                str(tiny_params_file),
            ]
        )
        == 0
    )


def test_bad_manifest_label_is_named(tmp_path, capsys, tiny_params_file):
    m = tmp_path / "m.csv"
    m.write_text("slide_id,case_id,uri,label\na,c,a.svs,cancer\n")
    assert (
        main(
            [
                "patch",
                "--manifest",
                str(m),
                "--out",
                str(tmp_path),
                "--params",
                str(tiny_params_file),
            ]
        )
        == 1
    )
    assert "label 'cancer' of a is not one of ['normal', 'tumour']" in capsys.readouterr().err


def test_strategy_without_an_input_its_entry_needs_exits_1_naming_the_flag(
    tmp_path, capsys, tiny_dataset, tiny_params_file
):
    args = ["--manifest", str(tiny_dataset), "--splits", str(tmp_path / "splits.json")]
    args += ["--out", str(tmp_path / "retrain"), "--params", str(tiny_params_file)]
    assert main(["strategy", "retrain", *args]) == 1
    assert "strategy 'retrain' needs --student-features" in capsys.readouterr().err
    assert not (tmp_path / "retrain").exists()


def test_strategy_the_run_does_not_compare_is_skipped_with_the_reason(
    tmp_path, tiny_dataset, tiny_params_file
):
    raw = yaml.safe_load(tiny_params_file.read_text())
    raw["mil"]["strategies"] = ["retrain"]
    tiny_params_file.write_text(yaml.safe_dump(raw))
    args = ["--manifest", str(tiny_dataset), "--splits", str(tmp_path / "splits.json")]
    args += ["--out", str(tmp_path / "etc"), "--params", str(tiny_params_file)]
    assert main(["strategy", "etc", *args]) == 0
    summary = json.loads((tmp_path / "etc" / "summary.json").read_text())
    assert summary["strategy"] == "etc" and summary["skipped"]
    assert "not in mil.strategies" in summary["reason"]


def test_gate_reads_the_package_and_prints_its_decision(tmp_path, capsys, tiny_params_file):
    from efcm.config import load_params
    from tests.packages import build_package

    package = build_package(tmp_path / "p", load_params(tiny_params_file), 8)
    meta = json.loads((package / "model.json").read_text())
    out = tmp_path / "gate"
    args = ["--package", str(package), "--out", str(out), "--params", str(tiny_params_file)]
    assert main(["gate", *args]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    decision = json.loads((out / "decision.json").read_text())
    assert printed["promote"] is decision["promote"] is True
    assert decision["row"] == meta["row"] == "student.vfd.retrain"
    assert decision["delta_auc_ci_low"] == meta["metrics"][meta["row"]]["delta_auc_ci_low"]
    # the same package with a lower bound past the allowed drop is not promoted (still exit 0)
    raw = yaml.safe_load(tiny_params_file.read_text())
    raw["deploy"] = {"max_auc_drop": 0.01, "min_auc": 0.5}
    tiny_params_file.write_text(yaml.safe_dump(raw))
    assert main(["gate", *args]) == 0
    assert json.loads((out / "decision.json").read_text())["promote"] is False


@pytest.mark.parametrize("size", ["10", "9000", "big"])
def test_predict_heatmap_size_out_of_range_exits_2_naming_it(capsys, size):
    with pytest.raises(SystemExit) as err:
        main(["predict", "pkg", "slide.svs", "--heatmap", "h.png", "--heatmap-size", size])
    assert err.value.code == 2
    msg = capsys.readouterr().err
    assert "--heatmap-size" in msg and "64 to 8192" in msg and repr(size) in msg
