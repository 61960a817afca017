"""doit entry point for the project root.

``doit build-cache FLIGHT=examples/flights/demo.json`` builds the cache (the
command is a plugin: see pyproject.toml).  This file lets ``doit list`` and
``doit info <task>`` show the task graph; it holds no behaviour.
"""

from cachebuild.cli.runner import dodo_namespace

globals().update(dodo_namespace())
