"""The YAML side of the workspace config: the bounded loader and the parser.

Imported on first use by `aetherd.config_model` (a config file exists, or a client sends
one), so a daemon whose workspace has no config never loads PyYAML.
"""

from __future__ import annotations

from typing import Any

import yaml

from aetherd.config_model import (
    DEFAULT_MAX_DEPTH,
    MAX_EXPANDED_NODES,
    Parsed,
    _error,
    _text_problem,
    validate_data,
)


def locate(node: Any, loc: list[Any]) -> tuple[int | None, int | None]:
    """The 1-based line and column of `loc` in a composed YAML node tree."""
    mark = node.start_mark
    current = node
    for part in loc:
        if isinstance(current, yaml.MappingNode):
            found = None
            for key, value in current.value:
                if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                    found = (key, value)
            if found is None:
                break
            mark, current = found[0].start_mark, found[1]
        elif isinstance(current, yaml.SequenceNode) and isinstance(part, int):
            if not 0 <= part < len(current.value):
                break
            current = current.value[part]
            mark = current.start_mark
        else:
            break
    return mark.line + 1, mark.column + 1


def _yaml_problem(exc: yaml.YAMLError) -> dict[str, Any]:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    message = f"YAML syntax error: {problem}" + (f" ({context})" if context else "")
    if isinstance(exc, _TooDeep):
        message = str(problem)
    return {
        "loc": [],
        "line": mark.line + 1 if mark is not None else None,
        "column": mark.column + 1 if mark is not None else None,
        "message": message,
    }


class _TooDeep(yaml.YAMLError):
    """The document nests deeper than the loader's `max_depth`."""

    def __init__(self, max_depth: int, mark: Any) -> None:
        super().__init__(f"nested deeper than {max_depth} levels")
        self.problem = f"the document is nested deeper than {max_depth} levels"
        self.problem_mark = mark


class BoundedLoader(yaml.SafeLoader):
    """A SafeLoader that refuses nesting deeper than `max_depth`.

    Flow collections (`[`, `{`) are counted in the scanner, before PyYAML's simple-key
    lookahead (quadratic in the flow depth) can cost anything; block nesting is
    counted as nodes are composed.
    """

    def __init__(self, text: str, max_depth: int = DEFAULT_MAX_DEPTH) -> None:
        super().__init__(text)
        self.max_depth = max_depth
        self._depth = 0

    def fetch_flow_collection_start(self, TokenClass: Any) -> None:
        if self.flow_level >= self.max_depth:
            raise _TooDeep(self.max_depth, self.get_mark())
        super().fetch_flow_collection_start(TokenClass)

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > self.max_depth:
                # PyYAML's stubs leave peek_event unannotated.
                event = self.peek_event()  # type: ignore[no-untyped-call]
                raise _TooDeep(self.max_depth, event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def compose(text: str, max_depth: int = DEFAULT_MAX_DEPTH) -> tuple[Any, Any]:
    """Compose and construct one YAML document: (node, data). Raises yaml.YAMLError."""
    loader = BoundedLoader(text, max_depth)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    return node, data


def _children(node: Any) -> list[Any]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _structure_problems(root: Any) -> list[dict[str, Any]]:
    """Recursive aliases, alias bombs and duplicate keys, found on the node graph."""
    sizes: dict[int, int] = {}
    visiting: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        if finished:
            visiting.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(child)] for child in _children(node))
            if sizes[id(node)] > MAX_EXPANDED_NODES:
                message = f"the document expands to more than {MAX_EXPANDED_NODES} values"
                return [_error([], message, root)]
            continue
        if id(node) in sizes:
            continue
        if id(node) in visiting:
            mark = node.start_mark
            return [
                {
                    "loc": [],
                    "line": mark.line + 1,
                    "column": mark.column + 1,
                    "message": "recursive alias",
                }
            ]
        visiting.add(id(node))
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in sizes)
    errors: list[dict[str, Any]] = []
    seen_nodes: set[int] = set()
    walk: list[tuple[Any, list[Any]]] = [(root, [])]
    while walk:
        node, loc = walk.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys: set[str] = set()
            for key, value in node.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else None
                if name is not None and name != "<<":
                    if name in keys:
                        mark = key.start_mark
                        errors.append(
                            {
                                "loc": [*loc, name],
                                "line": mark.line + 1,
                                "column": mark.column + 1,
                                "message": f"duplicate key {name!r}",
                            }
                        )
                    keys.add(name)
                walk.append((value, [*loc, name if name is not None else "?"]))
        elif isinstance(node, yaml.SequenceNode):
            walk.extend((item, [*loc, index]) for index, item in enumerate(node.value))
    errors.sort(key=lambda e: e["line"])
    return errors


def parse_yaml(text: str, *, max_terminals: int = 64, max_depth: int = DEFAULT_MAX_DEPTH) -> Parsed:
    """Parse and validate YAML config text; errors point at YAML lines."""
    problem = _text_problem(text)
    if problem is not None:
        return Parsed(None, [problem])
    try:
        loader = BoundedLoader(text, max_depth)
    except yaml.YAMLError as exc:  # the reader refuses a control character at once
        return Parsed(None, [_yaml_problem(exc)])
    try:
        node = loader.get_single_node()
        if node is not None:
            # Before construction: merge keys (`<<`) are flattened into the nodes then.
            problems = _structure_problems(node)
            if problems:
                return Parsed(None, problems)
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        return Parsed(None, [_yaml_problem(exc)])
    except (ValueError, RecursionError) as exc:  # e.g. a huge integer
        return Parsed(None, [{"loc": [], "line": None, "column": None, "message": str(exc)}])
    finally:
        loader.dispose()
    return validate_data(data, node, max_terminals=max_terminals)
