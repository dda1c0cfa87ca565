"""Table files: written atomically, with the user's umask, and a folder as target is one clear error."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pyarrow as pa
import pytest

from vims.errors import InputError
from vims.tables import read_table, write_table


def test_written_table_gets_the_mode_of_a_new_file_under_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = write_table(pa.table({"x": [1, 2]}), tmp_path / "t.parquet")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert read_table(path).column("x").to_pylist() == [1, 2]


def test_a_folder_as_target_is_refused_and_left_alone(tmp_path: Path) -> None:
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "keep.txt").write_text("keep")
    with pytest.raises(InputError, match="is a folder"):
        write_table(pa.table({"x": [1]}), tmp_path / "report")
    assert (tmp_path / "report" / "keep.txt").read_text() == "keep"
    assert [p.name for p in tmp_path.iterdir()] == ["report"]  # no temporary file left behind
