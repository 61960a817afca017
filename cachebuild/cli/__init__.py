"""The doit commands and the wrapper around a build: lock, report, exit codes."""
