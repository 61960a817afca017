"""Checks many modules' tests make: ``__all__`` is the public surface, importing stays light.

``assert_public_surface(module)``: ``__all__`` lists exactly the public
names the module's source defines at top level (functions, classes,
assignments, annotated assignments), and each of them exists.

``own_public_names(module)``: the same from the imported module rather than
its source: the public names whose objects the module itself defines (not
imported modules or names).

``heavy_imports("cachebuild.x", ...)``: which heavy libraries a fresh
interpreter has loaded after importing the given modules (``[]`` is light).
"""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from types import ModuleType

__all__ = ["HEAVY", "assert_public_surface", "defined_names", "heavy_imports", "own_public_names"]

#: The libraries a light import must not pull in (numerics, the model runtimes, the index, images).
HEAVY = ("numpy", "onnx", "onnxruntime", "faiss", "PIL")


def defined_names(module: ModuleType) -> set[str]:
    """The names ``module``'s source binds at top level: def, class, ``x = ``, ``x: T = ``."""
    defined: set[str] = set()
    for node in ast.parse(inspect.getsource(module)).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Assign):
            defined |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            defined.add(node.target.id)
    return defined


def assert_public_surface(module: ModuleType) -> None:
    """``module.__all__`` lists exactly the public names it defines, and each is there."""
    public = {n for n in defined_names(module) if not n.startswith("_")}
    assert public == set(module.__all__), (
        f"{module.__name__}: public but not in __all__: {sorted(public - set(module.__all__))}; "
        f"in __all__ but not defined: {sorted(set(module.__all__) - public)}"
    )
    assert all(hasattr(module, n) for n in module.__all__)


def own_public_names(module: ModuleType) -> set[str]:
    """Names ``module`` defines itself (not imports), without a leading underscore (read from its source)."""
    return {n for n in defined_names(module) if not n.startswith("_") and n != "TYPE_CHECKING"}


def heavy_imports(*modules: str, heavy: tuple[str, ...] = HEAVY) -> list[str]:
    """Which of ``heavy`` a fresh interpreter has loaded after importing ``modules``, sorted."""
    code = (
        f"import sys, {', '.join(modules)}; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return ast.literal_eval(out.stdout.strip())
