"""The command line contract: exit codes and one-line errors."""

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
