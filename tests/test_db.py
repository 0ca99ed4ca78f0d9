import asyncio
import json
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from qubax.records import db, tables


def test_ids_sort_by_creation_and_fit_their_columns() -> None:
    ids = [tables.new_id("gen") for _ in range(1000)]
    stamps = [one[: len("gen_") + 13] for one in ids]  # microseconds; ids made within one may come in any order
    assert stamps == sorted(stamps)  # new rows go to the end of the primary-key index
    assert len(set(ids)) == len(ids)
    assert all(len(one) <= 32 and one.startswith("gen_") for one in ids)


def test_the_migrations_make_the_tables_the_models_describe(tmp_path: Path) -> None:
    """Alembic's own comparison of the migrated schema with the models: a model changed without a
    migration (or the reverse) fails here."""

    async def compare() -> list[Any]:
        engine = db.connect(f"sqlite+aiosqlite:///{tmp_path / 'q.db'}")
        await db.migrate(engine)
        async with engine.connect() as connection:
            found = await connection.run_sync(
                lambda sync: compare_metadata(MigrationContext.configure(sync), tables.Base.metadata)
            )
        await engine.dispose()
        return list(found)

    assert asyncio.run(compare()) == []


KEY = "INSERT INTO api_keys (id, name, prefix, digest, test, created_at) VALUES ('key_1', 'k', 'p', 'd', 0, :at)"
JOB = (
    "INSERT INTO image_jobs (id, key_id, endpoint, model, fields, public_url, status, reserved_images, "
    "reserved_micros, cancel_requested, created_at) VALUES (:id, 'key_1', :endpoint, 'm', '{}', 'http://x', "
    ":status, 1, 0, 0, :at)"
)
INPUT = "INSERT INTO job_inputs (job_id, position, field, filename, data) VALUES (:id, 0, 'image', 'a.png', :data)"


def test_jobs_waiting_with_their_files_in_rows_fail_at_the_upgrade_that_moves_them(tmp_path: Path) -> None:
    """Migration 0009: job files leave the database for the image storage. A job still waiting then had
    its files in rows, which go: it fails, saying so; an ended job, or a generation, is left as it was."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine, text

    engine = create_engine(f"sqlite:///{tmp_path / 'q.db'}")
    config = Config()
    config.set_main_option("script_location", str(Path(db.__file__).parent / "migrations"))
    at = "2026-12-01 00:00:00"
    jobs = [
        ("job_edit", "edits", "queued"),
        ("job_generation", "generations", "queued"),
        ("job_ended", "edits", "succeeded"),
    ]
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0008")
        connection.execute(text(KEY), {"at": at})
        for job_id, endpoint, status in jobs:
            connection.execute(
                text(JOB), {"id": job_id, "endpoint": f"/v1/images/{endpoint}", "status": status, "at": at}
            )
        for job_id in ("job_edit", "job_ended"):
            connection.execute(text(INPUT), {"id": job_id, "data": b"\x89PNG"})
        command.upgrade(config, "head")
        found = {job_id: status for job_id, status in connection.execute(text("SELECT id, status FROM image_jobs"))}
        error = connection.execute(text("SELECT error FROM image_jobs WHERE id = 'job_edit'")).scalar_one()
        left = connection.execute(text("SELECT count(*) FROM job_inputs")).scalar_one()
    engine.dispose()
    assert found == {"job_edit": "failed", "job_generation": "queued", "job_ended": "succeeded"}
    assert json.loads(error)["code"] == "job_inputs_lost" and left == 0


SLOW = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 5000000) SELECT count(*) FROM n"


def test_a_statement_cancelled_mid_way_stays_cancelled(tmp_path: Path) -> None:
    """Stopping a node cancels its background loops mid-statement: SQLAlchemy reports that cancellation
    to its error hook as a disconnect, which must not become our `DatabaseUnavailable` (the loops take
    that for a database that is away and go on looking, so the node never stopped)."""

    async def cancel_mid_statement() -> BaseException | None:
        engine = db.connect(f"sqlite+aiosqlite:///{tmp_path / 'q.db'}")
        try:
            async with db.sessions(engine)() as session:
                statement = asyncio.create_task(session.execute(sa.text(SLOW)))
                await asyncio.sleep(0.3)  # well inside the statement, which takes seconds
                statement.cancel()
                try:
                    await statement
                except BaseException as exc:  # what the caller would see is the point
                    return exc
                return None
        finally:
            await engine.dispose()

    assert isinstance(asyncio.run(cancel_mid_statement()), asyncio.CancelledError)
