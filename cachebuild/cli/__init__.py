"""The doit commands and the wrapper around a build: lock, report, exit codes."""

from cachebuild.cli.startup import guard

guard()  # a Ctrl-C while the commands load is exit 130, not a traceback
