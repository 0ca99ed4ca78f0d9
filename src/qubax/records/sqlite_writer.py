"""The usage ledger's helper process for a SQLite file (`writers.py` says why a process), run as
`python -m qubax.records.sqlite_writer PATH` by `ledger.SqliteSink`.

Each frame is one batch: a JSON array of inserts, `[table, [column, ...], [[value, ...], ...]]`, all
run in one transaction, which commits before the answer goes back.
"""

import json
import sqlite3
import sys
from typing import Any

from qubax.records import writers

# WAL lets readers (auth lookups, the CLI) run beside the writer, and with synchronous=NORMAL a
# commit survives a crash of the process, though not of the machine, without an fsync per request.
PRAGMAS = ("PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL", "PRAGMA busy_timeout=5000")
ROWS_PER_STATEMENT = 500  # SQLite takes at most 32,766 parameters a statement


def open_database(path: str) -> sqlite3.Connection:
    connection = sqlite3.connect(path)
    for pragma in PRAGMAS:
        connection.execute(pragma)
    return connection


def write(connection: sqlite3.Connection, batch: bytes) -> None:
    with connection:  # one transaction: commits, or rolls back and raises
        for table, columns, rows in json.loads(batch):
            for start in range(0, len(rows), ROWS_PER_STATEMENT):
                connection.execute(*statement(table, columns, rows[start : start + ROWS_PER_STATEMENT]))


def statement(table: str, columns: list[str], rows: list[list[Any]]) -> tuple[str, list[Any]]:
    """One multi-row INSERT: one step through SQLite for the whole batch instead of one per row. A row
    whose id is taken is left out (`recording.finish`: work a node took over was charged already)."""
    values = "(" + ", ".join("?" * len(columns)) + ")"
    rows_sql = ", ".join([values] * len(rows))
    sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES {rows_sql} ON CONFLICT DO NOTHING"
    return sql, [value for row in rows for value in row]


if __name__ == "__main__":
    database = open_database(sys.argv[1])
    writers.run(lambda batch: write(database, batch))
