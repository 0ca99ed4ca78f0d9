"""The usage ledger's writer for a SQLite file: a small process of its own, run as
`python -m qubax.sqlite_writer PATH` by `ledger.SqliteSink`.

Why a process: a thread writing SQLite shares the GIL with the event loop, and every time the two
hand it over (several times a batch) the event loop's thread paid for it: with the writer in a
thread the light benchmark ran ~25% slower than with no usage record at all; with this process,
about as fast (bench/README.md).

Protocol, on stdin and stdout: each batch is a 4-byte big-endian length and a JSON array of inserts,
`[table, [column, ...], [[value, ...], ...]]`, all run in one transaction; the answer is one line,
`ok`, or `error: <message>` after a rollback. End of input (the app closing, or dying) ends the process.
Standard library only, so it starts in a few tens of milliseconds.
"""

import json
import signal
import sqlite3
import sys
from typing import Any, BinaryIO

# WAL lets readers (auth lookups, the CLI) run beside the writer, and with synchronous=NORMAL a
# commit survives a crash of the process, though not of the machine, without an fsync per request.
PRAGMAS = ("PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL", "PRAGMA busy_timeout=5000")
LENGTH_BYTES = 4
ROWS_PER_STATEMENT = 500  # SQLite takes at most 32,766 parameters a statement


def tune(connection: sqlite3.Connection) -> None:
    for pragma in PRAGMAS:
        connection.execute(pragma)


def serve(path: str, requests: BinaryIO, answers: BinaryIO) -> None:
    connection = sqlite3.connect(path)
    tune(connection)
    while len(head := requests.read(LENGTH_BYTES)) == LENGTH_BYTES:
        inserts = json.loads(requests.read(int.from_bytes(head, "big")))
        try:
            with connection:  # one transaction: commits, or rolls back and raises
                for table, columns, rows in inserts:
                    for start in range(0, len(rows), ROWS_PER_STATEMENT):
                        connection.execute(*statement(table, columns, rows[start : start + ROWS_PER_STATEMENT]))
        except sqlite3.Error as exc:
            answers.write(b"error: " + " ".join(str(exc).split()).encode() + b"\n")
        else:
            answers.write(b"ok\n")
        answers.flush()
    connection.close()


def statement(table: str, columns: list[str], rows: list[list[Any]]) -> tuple[str, list[Any]]:
    """One multi-row INSERT: one step through SQLite for the whole batch instead of one per row."""
    values = "(" + ", ".join("?" * len(columns)) + ")"
    sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES {', '.join([values] * len(rows))}"
    return sql, [value for row in rows for value in row]


if __name__ == "__main__":
    # Stopping a service often signals every process it has (systemd, `docker stop`): the server then
    # finishes its requests, whose records this process must still write. It stops when its input ends.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    serve(sys.argv[1], sys.stdin.buffer, sys.stdout.buffer)
