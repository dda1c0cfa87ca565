"""The Arrow schemas of everything VIMS writes: one module, documented in ``docs/schemas.md``.

On disk these tables are Parquet (:func:`vims.tables.write_table`), on the wire Arrow IPC batches.
Each schema carries its name and version in its metadata (``vims.schema``, ``vims.version``) so a
reader can tell a trace file from an event file.
"""

from __future__ import annotations

import pyarrow as pa

from vims.errors import InputError

SCHEMA_VERSION = "1"


def _named(name: str, fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(fields, metadata={"vims.schema": name, "vims.version": SCHEMA_VERSION})


#: One row per process trace (a whole sequence of system calls).
TRACE_SCHEMA = _named(
    "trace",
    [
        pa.field("trace_id", pa.string(), nullable=False),  # stable: source + path or capture + pid
        pa.field("source", pa.string(), nullable=False),  # adfa-ld | unm | vims
        pa.field("program", pa.string()),
        # The program the trace's parent ran when the trace began (VIMS captures; null where unknown)
        pa.field("parent", pa.string()),
        pa.field("split", pa.string()),  # train | validation | attack
        pa.field("label", pa.string(), nullable=False),  # normal | attack
        pa.field("family", pa.string()),  # attack family, e.g. Hydra_FTP
        pa.field("syscalls", pa.list_(pa.int32()), nullable=False),
        pa.field("length", pa.int32(), nullable=False),
    ],
)

#: One row per system call trapped in the guest by the collector.
EVENT_SCHEMA = _named(
    "event",
    [
        pa.field("seq", pa.uint64(), nullable=False),  # per-sender sequence number, no gaps
        pa.field("ts_ns", pa.uint64(), nullable=False),  # host CLOCK_REALTIME at the trap
        pa.field("vm_id", pa.string(), nullable=False),
        pa.field("vcpu", pa.uint16(), nullable=False),
        pa.field("pid", pa.int32(), nullable=False),
        pa.field("tgid", pa.int32(), nullable=False),
        pa.field("comm", pa.string(), nullable=False),
        pa.field("cr3", pa.uint64(), nullable=False),
        pa.field("nr", pa.int32(), nullable=False),  # x86-64 syscall number
        pa.field("args", pa.list_(pa.uint64(), 6), nullable=False),
        pa.field("user_ip", pa.uint64(), nullable=False),  # user-space return address (RCX)
        pa.field("path", pa.string()),  # the path argument of calls that take one, read from guest memory
        pa.field("ppid", pa.int32()),  # the task's parent process
        # The command line of an execve (space separated, at most 512 characters): busybox runs its
        # applets as /proc/self/exe, and only argv[0] says "sh".
        pa.field("argv", pa.string()),
        pa.field("site", pa.string()),  # the call site as an ASLR-invariant token, module+0xoffset
    ],
)

#: One row per scored trace (``vims score``). Higher score = more anomalous.
SCORE_SCHEMA = _named(
    "score",
    [
        pa.field("trace_id", pa.string(), nullable=False),
        pa.field("split", pa.string()),
        pa.field("label", pa.string()),
        pa.field("family", pa.string()),
        pa.field("program", pa.string()),
        pa.field("score", pa.float64(), nullable=False),
        pa.field("anomalous", pa.bool_(), nullable=False),
        # A normal trace the model was fitted on (its training or an update, by the card's trace keys);
        # null where the scorer could not tell (no card, or a table written before this column).
        pa.field("fitted", pa.bool_()),
    ],
)

#: One row per result of a static integrity check (``vims check``).
CHECK_SCHEMA = _named(
    "check",
    [
        pa.field("check", pa.string(), nullable=False),  # kernel-text, syscall-table, ...
        pa.field("target", pa.string(), nullable=False),  # what was checked: a symbol, a syscall, a program
        pa.field("status", pa.string(), nullable=False),  # pass | fail | error
        pa.field("detail", pa.string()),
        pa.field("cost", pa.string(), nullable=False),  # light | deep
        pa.field("ts_ns", pa.uint64(), nullable=False),
        pa.field("fields", pa.string()),  # JSON object: the check's declared columns and their values
    ],
)

#: One row per process per batch, from the A-VM's scorer workers (:mod:`vims.avm.scoring`).
AVM_RESULT_SCHEMA = _named(
    "avm-result",
    [
        pa.field("vm_id", pa.string(), nullable=False),  # the VM the process runs in
        pa.field("pid", pa.int32(), nullable=False),
        pa.field("tgid", pa.int32(), nullable=False),
        pa.field("ppid", pa.int32()),  # the parent, when the collector gives it
        pa.field("comm", pa.string(), nullable=False),  # the kernel's name of the task (latest)
        pa.field("name", pa.string(), nullable=False),  # the program it runs (execve path or argv[0], else comm)
        pa.field("cmdline", pa.string()),  # the command line of the execve that started it, when known
        pa.field("program", pa.string(), nullable=False),  # the model-set key that scored it ("*": fallback)
        pa.field("calls", pa.int64(), nullable=False),  # calls of this process in the batch
        pa.field("total_calls", pa.int64(), nullable=False),  # calls of this process so far
        pa.field("windows_above", pa.int64(), nullable=False),  # windows of this batch above threshold
        pa.field("max_window", pa.float64(), nullable=False),  # the rarest window of this batch (mean surprise)
        pa.field("threshold", pa.float64(), nullable=False),  # the window threshold applied
        pa.field("score", pa.float64(), nullable=False),  # trace score so far, as batch scoring gives it
        pa.field("first_seq", pa.uint64(), nullable=False),  # the collector's seq of its first event in the batch
        pa.field("last_seq", pa.uint64(), nullable=False),
        pa.field("evidence", pa.list_(pa.string()), nullable=False),  # the rarest window's calls, when above
    ],
)

SCHEMAS: dict[str, pa.Schema] = {
    "trace": TRACE_SCHEMA,
    "event": EVENT_SCHEMA,
    "score": SCORE_SCHEMA,
    "check": CHECK_SCHEMA,
    "avm-result": AVM_RESULT_SCHEMA,
}


def conform(table: pa.Table, schema: pa.Schema, where: str | None = None) -> pa.Table:
    """Return ``table`` with exactly ``schema``'s columns, in order, cast to its types.

    Extra columns are dropped; a missing nullable column is added as nulls (files written before it
    existed stay readable); a missing required column or a value that cannot be cast is an
    :class:`~vims.errors.InputError` naming ``where``.

    >>> t = pa.table({"seq": [1], "x": ["dropped"]})
    >>> conform(t, pa.schema([("seq", pa.uint64()), ("note", pa.string())])).to_pylist()
    [{'seq': 1, 'note': None}]
    >>> conform(t, TRACE_SCHEMA, where="t.parquet")
    Traceback (most recent call last):
    ...
    vims.errors.InputError: t.parquet: not a trace table: missing columns trace_id, source, ...
    """
    missing = [f.name for f in schema if f.name not in table.column_names and not f.nullable]
    if missing:
        kind = (schema.metadata or {}).get(b"vims.schema", b"expected").decode()
        shown = ", ".join(missing[:2]) + (", ..." if len(missing) > 2 else "")
        raise InputError(f"not a{'n' if kind[0] in 'aeiou' else ''} {kind} table: missing columns {shown}",
                         where=where)
    for f in schema:
        if f.name not in table.column_names:
            table = table.append_column(f.name, pa.nulls(table.num_rows, f.type))
    try:
        return table.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise InputError(f"columns do not fit the schema: {exc}", where=where) from exc
