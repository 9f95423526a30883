"""YAML loading with a bound on alias expansion (no "billion laughs").

PyYAML shares the node of an anchor between its aliases, so a few hundred bytes of nested
aliases (``&b [*a, *a, ...]``, ``&c [*b, *b, ...]``) load quickly into a structure that expands
to billions of values. Anything that walks it (type checks, ``repr`` in an error message,
``yaml.safe_dump``, ``json.dumps``) then runs for minutes into a MemoryError. The loaders here
count the nodes of the document with every alias expanded, as it is composed, and stop with a
:class:`YAMLExpansionError` (a ``yaml.YAMLError`` with the line and column) once the count
passes :data:`MAX_NODES`, or when an alias refers to the node that contains it (infinite
expansion).
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import yaml
from yaml.composer import ComposerError
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, SequenceNode

#: Most nodes a document may expand to (scalars, sequences, mappings, keys included).
MAX_NODES = 100_000

_SIZE = "_repo_rl_expanded_size"


class YAMLExpansionError(ComposerError):
    """Aliases expand the document past :data:`MAX_NODES` nodes, or an alias is recursive."""


class NodeBudgetMixin:
    """Composer mixin for a ``yaml.SafeLoader`` subclass: counts expanded nodes.

    Each composed node records the size of its subtree with aliases expanded (1 for a scalar,
    1 + the children's sizes otherwise); an alias costs the size of its anchor's subtree. The
    work is linear in the text, however large the expansion.
    """

    max_nodes: int = MAX_NODES

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(AliasEvent):  # type: ignore[attr-defined]
            event = self.peek_event()  # type: ignore[attr-defined]
            target = self.anchors.get(event.anchor)  # type: ignore[attr-defined]
            if target is not None and getattr(target, _SIZE, None) is None:
                # The anchored node is still being composed: it contains itself.
                raise YAMLExpansionError(
                    None, None, f"alias *{event.anchor} refers to a node that contains it (infinite expansion)",
                    event.start_mark,
                )
            return super().compose_node(parent, index)  # type: ignore[misc]
        node = super().compose_node(parent, index)  # type: ignore[misc]
        if isinstance(node, SequenceNode):
            size = 1 + sum(getattr(child, _SIZE, 1) for child in node.value)
        elif isinstance(node, MappingNode):
            size = 1 + sum(getattr(k, _SIZE, 1) + getattr(v, _SIZE, 1) for k, v in node.value)
        else:
            size = 1
        if size > self.max_nodes:
            raise YAMLExpansionError(
                None, None,
                f"aliases expand this document to more than {self.max_nodes} nodes (nested aliases, "
                "a 'billion laughs' file?); write the values out or use fewer nested aliases",
                node.start_mark,
            )
        setattr(node, _SIZE, size)
        return node


class BoundedSafeLoader(NodeBudgetMixin, yaml.SafeLoader):
    """``yaml.SafeLoader`` whose documents may expand to at most :data:`MAX_NODES` nodes."""


@functools.lru_cache(maxsize=None)
def bounded(loader: type = yaml.SafeLoader) -> type:
    """``loader`` (a ``yaml.SafeLoader`` subclass) with the alias-expansion bound added;
    its own constructors (e.g. duplicate-key checks) keep working."""
    if issubclass(loader, NodeBudgetMixin):
        return loader
    return type(f"Bounded{loader.__name__}", (NodeBudgetMixin, loader), {})


def load(text: Any, loader: Optional[type] = None) -> Any:
    """``yaml.load(text)`` with a SafeLoader-based ``loader`` (default ``yaml.SafeLoader``),
    bounded. Raises :class:`YAMLExpansionError` (a ``yaml.YAMLError``) past the bound."""
    return yaml.load(text, Loader=bounded(loader or yaml.SafeLoader))


def safe_load(text: Any) -> Any:
    """Drop-in for ``yaml.safe_load`` with the alias-expansion bound."""
    return load(text)
