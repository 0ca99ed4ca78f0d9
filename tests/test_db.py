from qubax import db


def test_ids_sort_by_creation_and_fit_their_columns() -> None:
    ids = [db.new_id("gen") for _ in range(1000)]
    stamps = [one[: len("gen_") + 13] for one in ids]  # microseconds; ids made within one may come in any order
    assert stamps == sorted(stamps)  # new rows go to the end of the primary-key index
    assert len(set(ids)) == len(ids)
    assert all(len(one) <= 32 and one.startswith("gen_") for one in ids)
