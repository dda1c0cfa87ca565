"""The data set importers and ``vims datasets``: small fixtures written here, the shared data sets, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vims.datasets.adfa import read_adfa_ld
from vims.datasets.unm import read_unm
from vims.errors import InputError
from vims.schemas import TRACE_SCHEMA


def vims(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the real ``vims`` command."""
    return subprocess.run([sys.executable, "-m", "vims.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def write_adfa(root: Path) -> Path:
    layout = root / "ADFA-LD"
    files = {
        "Training_Data_Master/UTD-0001.txt": "6 6 63 6 42 120 \n",
        "Training_Data_Master/UTD-0002.txt": "",  # empty traces are kept
        "Validation_Data_Master/UVD-0001.txt": "3 4 5\n6",
        "Attack_Data_Master/Hydra_FTP_3/UAD-Hydra-FTP-3-1.txt": "102 102 11",
        "Attack_Data_Master/Web_Shell_10/UAD-WS-10-1.txt": "1 2",
        "ADFA-LD+Syscall+List.txt": "not a trace, beside the layout",
    }
    for name, text in files.items():
        (layout / name).parent.mkdir(parents=True, exist_ok=True)
        (layout / name).write_text(text)
    return layout


def zip_folder(folder: Path, target: Path) -> Path:
    with zipfile.ZipFile(target, "w") as zf:
        for path in sorted(folder.rglob("*")):
            zf.write(path, path.relative_to(folder.parent))
    return target


def write_unm(root: Path, name: str = "toy") -> Path:
    folder = root / name
    (folder / "normal").mkdir(parents=True)
    (folder / "intrusion").mkdir()
    # Two processes interleaved; trailing blanks as in the real files.
    (folder / "normal" / "run.int").write_text("10 4  \n11 2\n10 5\n\n11 66  \n10 6\n")
    (folder / "intrusion" / "fwd-loops-2.int").write_text("7 1\n7 2\n")
    return folder


def test_adfa_folder_and_zip_give_the_same_table(tmp_path: Path) -> None:
    layout = write_adfa(tmp_path)
    from_folder = read_adfa_ld(layout)
    from_parent = read_adfa_ld(tmp_path)
    from_zip = read_adfa_ld(zip_folder(layout, tmp_path / "adfa.zip"))
    assert from_folder.equals(from_zip) and from_folder.equals(from_parent)
    rows = {r["trace_id"]: r for r in from_folder.to_pylist()}
    assert rows["adfa-ld:Training_Data_Master/UTD-0001.txt"]["syscalls"] == [6, 6, 63, 6, 42, 120]
    assert rows["adfa-ld:Training_Data_Master/UTD-0002.txt"]["length"] == 0
    assert rows["adfa-ld:Validation_Data_Master/UVD-0001.txt"]["split"] == "validation"
    attack = rows["adfa-ld:Attack_Data_Master/Hydra_FTP_3/UAD-Hydra-FTP-3-1.txt"]
    assert (attack["split"], attack["label"], attack["family"]) == ("attack", "attack", "Hydra_FTP")
    assert rows["adfa-ld:Attack_Data_Master/Web_Shell_10/UAD-WS-10-1.txt"]["family"] == "Web_Shell"
    assert from_folder.schema.equals(TRACE_SCHEMA)


def test_unm_splits_interleaved_processes(tmp_path: Path) -> None:
    table = read_unm(write_unm(tmp_path))
    rows = {r["trace_id"]: r for r in table.to_pylist()}
    assert rows["unm:toy/normal/run.int:10"]["syscalls"] == [4, 5, 6]
    assert rows["unm:toy/normal/run.int:11"]["syscalls"] == [2, 66]
    intrusion = rows["unm:toy/intrusion/fwd-loops-2.int:7"]
    assert (intrusion["label"], intrusion["family"], intrusion["program"]) == ("attack", "fwd-loops", "toy")
    assert read_unm(tmp_path / "toy", program="sendmail").column("program").unique().to_pylist() == ["sendmail"]


def test_unm_program_from_file_names_when_folder_joins_programs(tmp_path: Path) -> None:
    folder = tmp_path / "login-ps"
    (folder / "normal").mkdir(parents=True)
    (folder / "intrusion").mkdir()
    (folder / "normal" / "ps-normal.txt").write_text("1 2\n")
    (folder / "intrusion" / "login-homegrown.int").write_text("3 4\n")
    rows = read_unm(folder).to_pylist()
    assert {(r["program"], r["family"]) for r in rows} == {("ps", None), ("login", "homegrown")}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("6 6 x 7", "UTD-0001.txt:1: not an integer: 'x'"),
        ("6 6\n7 99999999999", "UTD-0001.txt:2: system call number out of range"),
        ("\x7fELF\0\0\0", "UTD-0001.txt: not a trace file (binary content)"),
    ],
)
def test_adfa_bad_tokens_name_file_and_line(tmp_path: Path, content: str, message: str) -> None:
    layout = write_adfa(tmp_path)
    (layout / "Training_Data_Master/UTD-0001.txt").write_text(content)
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_adfa_ld(layout)


def test_zip_without_the_layout_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.txt").write_text("1 2 3")
    with pytest.raises(InputError, match="no ADFA-LD layout"):
        read_adfa_ld(zip_folder(other, tmp_path / "other.zip"))
    (tmp_path / "junk.zip").write_bytes(b"PK not really")
    with pytest.raises(InputError, match="neither a folder nor a zip"):
        read_adfa_ld(tmp_path / "junk.zip")


def test_unm_line_with_three_fields(tmp_path: Path) -> None:
    folder = write_unm(tmp_path)
    (folder / "normal" / "run.int").write_text("10 4\n10 4 4\n")
    with pytest.raises(InputError, match=r"run.int:2: expected two integers 'PID SYSCALL', found 3"):
        read_unm(folder)
    with pytest.raises(InputError, match="no UNM layout"):
        read_unm(folder / "normal")


def test_cli_bad_input_exits_2_with_one_line_and_no_output(tmp_path: Path) -> None:
    layout = write_adfa(tmp_path)
    (layout / "Validation_Data_Master/UVD-0001.txt").write_text("1 2\n3 three")
    output = tmp_path / "out.parquet"
    result = vims("datasets", "import", "adfa-ld", layout, "-o", output)
    assert result.returncode == 2
    assert "UVD-0001.txt:2: not an integer: 'three'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not output.exists() and not list(tmp_path.glob(".out.parquet*"))


def test_cli_info_refuses_a_file_that_is_not_a_trace_table(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.parquet"
    pq.write_table(pa.table({"x": [1]}), bogus)
    result = vims("datasets", "info", bogus)
    assert result.returncode == 2 and "not a trace table: missing columns trace_id" in result.stderr
    result = vims("datasets", "info", tmp_path / "absent.parquet")
    assert result.returncode == 2 and "no such file" in result.stderr


def test_cli_import_unm_and_info_json(tmp_path: Path) -> None:
    output = tmp_path / "toy.parquet"
    assert vims("datasets", "import", "unm", write_unm(tmp_path), "-o", output, "--json").returncode == 0
    summary = json.loads(vims("datasets", "info", output, "--json").stdout)
    assert summary["traces"] == 3 and summary["by"]["label"] == {"attack": 1, "normal": 2}
    assert summary["syscalls"] == 7


@pytest.mark.datasets
def test_shared_adfa_ld_counts_and_readers(adfa_zip: Path, tmp_path: Path) -> None:
    output = tmp_path / "adfa.parquet"
    result = vims("datasets", "import", "adfa-ld", adfa_zip, "-o", output, "--json")
    assert result.returncode == 0, result.stderr
    frame = pd.read_parquet(output)
    assert frame["split"].value_counts().to_dict() == {"validation": 4372, "train": 833, "attack": 504}
    attacks = frame[frame["split"] == "attack"]
    assert set(attacks["family"]) == {"Adduser", "Hydra_FTP", "Hydra_SSH", "Meterpreter"}
    assert (frame["length"] == frame["syscalls"].map(len)).all()
    counts = dict(duckdb.sql(f"SELECT split, count(*) FROM '{output}' GROUP BY split").fetchall())
    assert counts == {"train": 833, "validation": 4372, "attack": 504}
    assert frame["trace_id"].is_unique


@pytest.mark.datasets
def test_shared_unm_sendmail_has_both_labels(unm_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "sm.parquet"
    result = vims("datasets", "import", "unm", unm_dir / "synthetic-sendmail", "-o", output)
    assert result.returncode == 0, result.stderr
    frame = pd.read_parquet(output)
    assert set(frame["label"]) == {"normal", "attack"}
    assert frame["trace_id"].is_unique and (frame["length"] > 0).all()
    # Every line of every file ends up in exactly one per-PID trace.
    lines = sum(1 for f in (unm_dir / "synthetic-sendmail").glob("*/*.int") for ln in f.open() if ln.split())
    assert frame["length"].sum() == lines


def test_cli_import_vims_capture(tmp_path: Path) -> None:
    from vims.events import example_events
    from vims.tables import write_table

    events = write_table(example_events([(5, "sh", 0, None), (6, "cat", 1, None), (5, "sh", 59, "/bin/ls"),
                                         (5, "ls", 2, "/etc")]), tmp_path / "events.parquet")
    output = tmp_path / "traces.parquet"
    result = vims("datasets", "import", "vims", events, "-o", output, "--label", "attack", "--json")
    assert result.returncode == 0, result.stderr
    frame = pd.read_parquet(output)
    assert sorted(map(list, frame["syscalls"])) == [[0], [1], [59, 2]]
    assert set(frame["label"]) == {"attack"} and set(frame["source"]) == {"vims"}
    bad = vims("datasets", "import", "vims", output, "-o", tmp_path / "x.parquet")  # a trace file, not events
    assert bad.returncode == 2 and "not an event table" in bad.stderr
