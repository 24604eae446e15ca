"""Nested Python containers of leaves, framework-free: what the torch trainer walks to
detach, slice and describe a carry or data of any structure (JAX has `jax.tree`).

A tree is a leaf, or a tuple (NamedTuples included), list or dict of trees; None is an
empty tree, as in JAX. Dict entries are visited in sorted key order, as JAX does, so the
two frameworks name the leaves of one structure alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _children(tree: Any) -> list[tuple[str, Any]] | None:
    """`(name, child)` pairs of a container, None for a leaf."""
    if isinstance(tree, dict):
        return [(f"[{key!r}]", tree[key]) for key in sorted(tree)]
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return [(f".{field}", getattr(tree, field)) for field in tree._fields]
    if isinstance(tree, (tuple, list)):
        return [(f"[{index}]", child) for index, child in enumerate(tree)]
    return None


def leaves(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Every leaf with its path from the root, e.g. `("[0]", h)` for a tuple `(h, c)`."""
    if tree is None:
        return []
    children = _children(tree)
    if children is None:
        return [(prefix, tree)]
    return [leaf for name, child in children for leaf in leaves(child, prefix + name)]


def structure(tree: Any) -> Any:
    """A comparable description of the containers, without the leaves."""
    if tree is None:
        return None
    children = _children(tree)
    if children is None:
        return "*"
    return (type(tree), tuple((name, structure(child)) for name, child in children))


def map_leaves(function: Callable[..., Any], tree: Any, *others: Any) -> Any:
    """`tree` with every leaf replaced by `function(leaf, *the same leaf of each other)`;
    the others must have the structure of `tree`."""
    if tree is None:
        return None
    children = _children(tree)
    if children is None:
        return function(tree, *others)
    if isinstance(tree, dict):
        return {key: map_leaves(function, tree[key], *(other[key] for other in others))
                for key in tree}
    mapped = [map_leaves(function, child, *(other[index] for other in others))
              for index, (_, child) in enumerate(children)]
    if hasattr(tree, "_fields"):
        return type(tree)(*mapped)
    return type(tree)(mapped)
