"""The local runner: each attempt of a task in a fresh process, retried, recorded in SQLite."""
