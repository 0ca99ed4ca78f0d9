"""The server's own plumbing: settings, start-up checks, the `qubax` command, connection limits,
logs, metrics and the long-lived objects the app's lifespan owns (`services`)."""
