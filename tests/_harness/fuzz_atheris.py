"""Coverage-guided fuzzing of the hostile-input parsers with atheris (libFuzzer).

    python tests/_harness/fuzz_atheris.py -runs=100000 -seed=1      # by hand
    CACHEBUILD_LONG=1 pytest tests/scenarios/test_fuzz.py -k atheris  # the long run

Each input picks a parser and feeds it the rest of the bytes: the flight
parser (bytes, and text through the normalised-record path), URL and
directory templates, the extra-headers variable and the HTTP settings.  The
parsers may return or raise one of the project's errors
(:class:`cachebuild.errors.CacheBuildError`); anything else is a finding,
which atheris reports with its traceback and a non-zero exit.
``pip install 'cachebuild[fuzz]'`` installs atheris.
"""

from __future__ import annotations

import json
import sys

import atheris

with atheris.instrument_imports():
    from cachebuild.errors import CacheBuildError
    from cachebuild.inputs.flight import flight_area, flight_from_record, parse_flight
    from cachebuild.providers.base import PLACEHOLDERS, fill_template, template_placeholders
    from cachebuild.providers.local import DIRECTORY_PLACEHOLDERS
    from cachebuild.providers.xyzconfig import HttpConfig, parse_headers
    from cachebuild.tilemath import Tile

_HTTP_NAMES = ("HTTP_TIMEOUT", "HTTP_RETRIES", "HTTP_BACKOFF", "RATE_LIMIT", "SUBDOMAINS")


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    which = fdp.ConsumeIntInRange(0, 4)
    try:
        if which == 0:
            f = parse_flight(fdp.ConsumeBytes(fdp.remaining_bytes()), "atheris.json")
            flight_area(f, 500.0)
        elif which == 1:
            text = fdp.ConsumeUnicodeNoSurrogates(fdp.remaining_bytes())
            try:
                obj = json.loads(text)
            except ValueError:
                return
            if isinstance(obj, dict):
                flight_from_record(obj)
        elif which == 2:
            allowed = PLACEHOLDERS if fdp.ConsumeBool() else DIRECTORY_PLACEHOLDERS
            template = fdp.ConsumeUnicodeNoSurrogates(fdp.remaining_bytes())
            template_placeholders(template, allowed)
            fill_template(template, Tile(1, 2, 3), key="k", s="a")
        elif which == 3:
            parse_headers(fdp.ConsumeUnicodeNoSurrogates(fdp.remaining_bytes()))
        else:
            env = {
                name: fdp.ConsumeUnicodeNoSurrogates(12)
                for name in _HTTP_NAMES
                if fdp.ConsumeBool()
            }
            HttpConfig.from_env(env)
    except CacheBuildError:
        pass


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
