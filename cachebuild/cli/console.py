"""The ``cachebuild`` console script: the project's commands without doit's command line.

``cachebuild build-cache FLIGHT=... ZOOM=17`` is ``doit build-cache ...``;
``--help`` (anywhere) prints the usage and the variables and exits 0,
``--version`` prints the version.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping

from cachebuild import __version__
from cachebuild._util.report import Report
from cachebuild._util.warn import operator_warnings
from cachebuild.cli.doitcmds import (
    _VARS_HELP,
    CacheInfoCmd,
    CompanionAgentCmd,
    GcStoreCmd,
    PreviewCacheCmd,
)
from cachebuild.cli.logsetup import configure_logging
from cachebuild.cli.runner import build_cache, clean_cache, verify_cache_cmd
from cachebuild.cli.startup import leave, started
from cachebuild.errors import UsageError, did_you_mean

__all__ = ["main", "usage"]


def _commands() -> dict[str, Callable[[Mapping[str, str]], int]]:

    return {
        "build-cache": build_cache,
        "verify-cache": verify_cache_cmd,
        "clean": clean_cache,
        "cache-info": CacheInfoCmd.impl,
        "preview-cache": PreviewCacheCmd.impl,
        "companion-agent": CompanionAgentCmd.impl,
        "gc-store": GcStoreCmd.impl,
    }


def usage(command: str | None = None) -> str:
    """The usage text: every command, or one, and the variables."""
    head = command or "{build-cache|verify-cache|clean|cache-info|preview-cache|gc-store}"

    return (
        f"usage: cachebuild {head} [NAME=value ...]\n       cachebuild --version\n\n"
        "Variables (also read from the environment as CACHEBUILD_<NAME>):\n" + _VARS_HELP + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code (docs/exit-codes.md)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["--version"], ["-V"]):
        sys.stdout.write(f"cachebuild {__version__}\n")
        return 0
    commands = _commands()
    if not argv or argv[0] in ("-h", "--help", "help"):
        (sys.stdout if argv else sys.stderr).write(usage())
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if any(a in ("-h", "--help") for a in rest):
        sys.stdout.write(usage(cmd if cmd in commands else None))
        return 0
    if cmd not in commands:
        sys.stderr.write(f"ERROR: unknown command {cmd!r}{did_you_mean(cmd, commands)}\n" + usage())
        return 2
    vars: dict[str, str] = {}
    for arg in rest:
        if "=" not in arg:
            sys.stderr.write(f"ERROR: unexpected argument {arg!r}; use NAME=value\n")
            return 2
        name, value = arg.split("=", 1)
        vars[name] = value
    try:
        vars = configure_logging(vars)
    except UsageError as exc:
        report = Report(cmd)
        report.fail(exc)
        report.emit("json" if vars.get("REPORT", "").lower() == "json" else "text")
        return report.exit_code
    started()  # the command handles Ctrl-C from here (cachebuild.cli.startup)
    with operator_warnings():
        code = commands[cmd](vars)
    return leave(code)  # the console script's process ends here, with the reported code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
