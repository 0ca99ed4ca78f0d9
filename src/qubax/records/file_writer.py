"""The helper process that writes small image files (`writers.py` says why a process), run as
`python -m qubax.records.file_writer` by `storage.FileWriter`.

Each frame is one file: the path's length (4 bytes, big-endian), the path (UTF-8), then the bytes.
"""

import os

from qubax.records import writers

PATH_LENGTH_BYTES = 4


def frame(path: str, data: bytes) -> bytes:
    name = path.encode()
    return len(name).to_bytes(PATH_LENGTH_BYTES, "big") + name + data


def write(payload: bytes) -> None:
    end = PATH_LENGTH_BYTES + int.from_bytes(payload[:PATH_LENGTH_BYTES], "big")
    # Readable by the service's user only, like the rest of the data folder.
    path = payload[PATH_LENGTH_BYTES:end].decode()
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as file:
        file.write(payload[end:])


if __name__ == "__main__":
    writers.run(write)
