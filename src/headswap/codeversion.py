"""A version of the code that turns an image file into an embedding, for the feature-cache key.

The cache key names the backbone, its weights, taps, pool and views, but the embeddings also
depend on code: how a file is decoded, resized and turned into views, and how the body
normalises pixels in its graph. ``code_version`` hashes exactly that code (``EMBEDDING_CODE``),
so a real change there re-embeds every image, and any other edit keeps the cache.

Each listed definition is hashed as its syntax tree with docstrings removed: comments,
docstrings, blank lines and formatting do not count; any change to a statement, a constant, a
default or a name does.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import inspect
from collections.abc import Iterable, Mapping

# (module, definition): the code between an image file and the features cached for it. A new
# function on that path belongs here, or editing it would leave stale embeddings in the cache.
EMBEDDING_CODE: tuple[tuple[str, str], ...] = (
    # Decoding: EXIF orientation, 16-bit scaling, transparency onto white.
    ("headswap.imaging", "open_rgb"),
    ("headswap.imaging", "_to_rgb"),
    # Resizing to the model's input size, and the greyscale fast path that must match open_rgb.
    ("headswap.imaging", "load_pixels"),
    ("headswap.imaging", "_RESAMPLING"),
    ("headswap.imaging", "_EXIF_ORIENTATION"),
    # Test-time views: which flips and turns, and how they are applied to the pixels.
    ("headswap.views", "view_transforms"),
    ("headswap.views", "apply_view_np"),
    # In-graph preprocessing: the uint8 cast and (x - mean) / std (buffers made in __init__),
    # and an ensemble member's resize and rounding. These also go into the cached ONNX body.
    ("headswap.backbones.body", "FrozenBody.__init__"),
    ("headswap.backbones.body", "FrozenBody.forward"),
    ("headswap.backbones.body", "EnsembleBody.forward"),
)


def _is_docstring(statement: ast.stmt | None) -> bool:
    return (
        isinstance(statement, ast.Expr)
        and isinstance(statement.value, ast.Constant)
        and isinstance(statement.value.value, str)
    )


def _without_docstrings(node: ast.AST) -> ast.AST:
    """``node`` with the docstring of every function and class in it removed (in place)."""
    for child in ast.walk(node):
        scopes = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef
        if isinstance(child, scopes) and child.body and _is_docstring(child.body[0]):
            child.body = child.body[1:] or [ast.Pass()]
    return node


def _defines(node: ast.stmt, name: str) -> bool:
    """Whether the top-level statement ``node`` defines ``name`` (def, class or assignment)."""
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return node.name == name
    targets = node.targets if isinstance(node, ast.Assign) else []
    if isinstance(node, ast.AnnAssign):
        targets = [node.target]
    return any(isinstance(target, ast.Name) and target.id == name for target in targets)


def normalized_definition(source: str, qualname: str) -> str:
    """The syntax tree of ``qualname`` (``f``, ``CONSTANT`` or ``Class.method``) in ``source``,
    dumped without docstrings, line numbers or comments.

    Raises:
        LookupError: ``source`` defines no ``qualname``.
    """
    body = ast.parse(source).body
    node = None
    for part in qualname.split("."):
        node = next((n for n in body if _defines(n, part)), None)
        if node is None:
            raise LookupError(f"{qualname} is not defined")
        body = getattr(node, "body", [])
    return ast.dump(_without_docstrings(node))


def source_version(sources: Mapping[str, str], entries: Iterable[tuple[str, str]]) -> str:
    """The version of ``entries`` given each module's source text (module name -> source)."""
    digest = hashlib.sha256()
    for module, qualname in entries:
        try:
            tree = normalized_definition(sources[module], qualname)
        except LookupError as error:
            raise LookupError(f"{module}: {error}") from None
        digest.update(f"{module}:{qualname}\n{tree}\n".encode())
    return digest.hexdigest()[:16]


@functools.cache
def code_version() -> str:
    """The version of ``EMBEDDING_CODE`` as installed; computed once per process.

    Raises:
        LookupError: a listed definition no longer exists (update ``EMBEDDING_CODE``).
    """
    modules = sorted({module for module, _ in EMBEDDING_CODE})
    sources = {name: inspect.getsource(importlib.import_module(name)) for name in modules}
    try:
        return source_version(sources, EMBEDDING_CODE)
    except LookupError as error:
        raise LookupError(f"headswap.codeversion.EMBEDDING_CODE is out of date: {error}") from None
