from __future__ import annotations

import subprocess
import sys

import pytest

from selva_cli.main import build_parser, main


def _subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_console_script_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "selva_cli.main", "--help"], capture_output=True, text=True, check=True)
    for name in _subcommands():
        assert name in out.stdout


@pytest.mark.parametrize("name", _subcommands())
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert "usage: selva " + name in capsys.readouterr().out


def test_no_subcommand_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_presets_lists_official_sizes(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "small_16k" in out and "157.28" in out and "134.84" in out


def test_expected_errors_are_one_line_without_traceback(tmp_path, capsys):
    from selva_cli.main import main

    missing = tmp_path / "nowhere.tsv"
    assert main(["precompute", "--input", str(missing), "--out", str(tmp_path / "data")]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"error: {missing}: no such file" and "Traceback" not in err
    bad = tmp_path / "bad.tsv"
    bad.write_text("just one cell per line\nanother\n")
    assert main(["precompute", "--input", str(bad), "--out", str(tmp_path / "data")]) == 1
    assert capsys.readouterr().err.startswith(f"error: {bad}: line 1: no 'id' column")
    # a folder as the table, a file as the dataset folder, a table with no data rows: one line each,
    # and no "rerun to resume" where nothing was started
    assert main(["precompute", "--input", str(tmp_path), "--out", str(tmp_path / "data")]) == 1
    folder_err = capsys.readouterr().err.strip()
    assert folder_err == f"error: {tmp_path}: is a folder; --input wants a clip table (TSV, CSV or Parquet)"
    header_only = tmp_path / "header.tsv"
    header_only.write_text("id\tlabel\n")
    assert main(["precompute", "--input", str(header_only), "--out", str(bad)]) == 1
    out_err = capsys.readouterr().err.strip()
    assert out_err == f"error: {bad}: --out is an existing file; it names the dataset folder to create or resume"
    assert main(["precompute", "--input", str(header_only), "--out", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"error: {header_only}: the table has no data rows (only a header or blank lines)"
    assert not (tmp_path / "empty").exists()  # nothing left behind
    # --debug shows the traceback instead
    from preprocessing.input_table import ManifestError

    with pytest.raises(ManifestError, match="no such file"):
        main(["--debug", "precompute", "--input", str(missing), "--out", str(tmp_path / "data")])
