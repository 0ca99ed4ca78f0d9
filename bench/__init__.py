"""Gateway overhead benchmark (issue 4). Run it with `.venv/bin/python -m bench`; see bench/README.md."""
