import asyncio
from pathlib import Path
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from qubax import db


def test_ids_sort_by_creation_and_fit_their_columns() -> None:
    ids = [db.new_id("gen") for _ in range(1000)]
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
                lambda sync: compare_metadata(MigrationContext.configure(sync), db.Base.metadata)
            )
        await engine.dispose()
        return list(found)

    assert asyncio.run(compare()) == []
