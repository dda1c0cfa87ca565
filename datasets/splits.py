"""Train/validation splits for data sets that come without them (UNM), deterministic from a seed.

A trace table's split is its ``split`` column (ADFA-LD's importer fills it from the layout: ``train``,
``validation``, ``attack``). :func:`assign_splits` fills it the same way for a table that has none:
attack traces go to ``attack``; the normal traces of each program are ordered by ``trace_id`` (so
the row order of the file does not matter), shuffled with ``seed``, and the first ``train`` fraction
goes to ``train``, the rest to ``validation`` (a program with two or more normal traces keeps at least
one in each; a program's only normal trace goes to ``train``).
The result is what ``vims train`` (``--split train``) and ``vims evaluate`` (every other split) expect.

>>> import pyarrow as pa
>>> t = pa.table({"trace_id": [f"n{i}" for i in range(6)] + ["a0"], "program": ["ps"] * 7,
...               "split": pa.array([None] * 7, pa.string()), "label": ["normal"] * 6 + ["attack"]})
>>> assign_splits(t, train=0.5, seed=1).column("split").to_pylist()
['train', 'validation', 'train', 'validation', 'train', 'validation', 'attack']
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from vims.errors import InputError


def assign_splits(table: pa.Table, train: float = 0.5, seed: int = 0, overwrite: bool = False) -> pa.Table:
    """``table`` with its ``split`` column filled: ``train``/``validation`` for normal traces, ``attack``.

    Parameters
    ----------
    table : pyarrow.Table
        A trace table (``trace_id``, ``label``, ``split``; ``program`` if present splits per program).
    train : float
        Fraction of each program's normal traces that goes to ``train`` (between 0 and 1, exclusive).
    seed : int
        Seed of the shuffle: the same seed gives the same split.
    overwrite : bool
        Replace splits the table already has (refused otherwise).
    """
    if not 0 < train < 1:
        raise InputError(f"the training fraction must be between 0 and 1, not {train}")
    present = sorted({s for s in table.column("split").to_pylist() if s is not None})
    if present and not overwrite:
        raise InputError(f"the table has splits already ({', '.join(present)}); give --overwrite to replace them")
    labels = table.column("label").to_pylist()
    other = sorted({str(x) for x in labels} - {"normal", "attack"})
    if other:
        raise InputError(f"labels must be 'normal' or 'attack' to split, found {', '.join(other)}")
    ids = table.column("trace_id").to_pylist()
    programs = table.column("program").to_pylist() if "program" in table.column_names else [None] * len(ids)
    split = np.array(["attack" if lab == "attack" else "validation" for lab in labels], dtype=object)
    rng = np.random.default_rng(seed)
    for program in sorted({p for p, lab in zip(programs, labels, strict=True) if lab == "normal"}, key=str):
        rows = sorted((i for i, (p, lab) in enumerate(zip(programs, labels, strict=True))
                       if p == program and lab == "normal"), key=lambda i: str(ids[i]))
        n_train = max(1, min(len(rows) - 1, round(train * len(rows)))) if len(rows) > 1 else 1
        order = rng.permutation(len(rows))
        split[[rows[j] for j in order[:n_train]]] = "train"
    return table.set_column(table.schema.get_field_index("split"), "split", pa.array(split.tolist(), pa.string()))
