"""What a recipe's source runs and imports, read with `ast` (never executed): the skills it starts with
`ctx.run_skill("name")` and the `skillbook.ml` modules it imports. The pipeline cache key
(Recipe.code_text) covers exactly that code."""

from __future__ import annotations

import ast


def skill_calls(source: str) -> set[str]:
    """Names of the skills `source` runs inside itself: string literals passed to `.run_skill(...)`.

    Parsed with `ast`, like `ml_imports`; a name built at run time cannot be seen, so recipes pass literals.
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    names = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if node.func.attr != "run_skill":
            continue
        args = [*node.args[:1], *(k.value for k in node.keywords if k.arg == "name")]
        names |= {a.value for a in args if isinstance(a, ast.Constant) and isinstance(a.value, str)}
    return names


def ml_imports(source: str, in_ml: bool) -> set[str]:
    """Names of the skillbook.ml modules `source` imports (`in_ml`: also its `from .x import` lines).

    Parsed with `ast`, so comments, parenthesised and multi-line imports, and imports inside
    functions (where the recipes put heavy ones) all count; a file that does not parse imports nothing.
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    names: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        module = node.module or ""
        if node.level == 0 and module == "skillbook.ml":
            names |= {alias.name for alias in node.names}
        elif node.level == 0 and module.startswith("skillbook.ml."):
            names.add(module.split(".")[2])
        elif in_ml and node.level == 1:  # one dot: a sibling module in ml/
            names |= {module.split(".")[0]} if module else {alias.name for alias in node.names}
    return names
