"""Reading JSON and YAML we did not write, bounded, and writing JSON that reads back the same.

Readers: `read_json(path)` (one JSON object), `parse_json(text, where)` (one JSON value, such as a
line of JSON lines), `read_yaml(path)` / `load_yaml(text, where)` (one YAML document) and
`read_yaml_documents(path)` (every document of a file, `---` between them). Each
refuses, in one line naming `file:line` where there is a line: bytes that are not UTF-8, nesting
deeper than MAX_DEPTH, a key given twice in one mapping (which would otherwise keep its last value
silently), and (YAML) aliases whose expansion would make the document larger than MAX_NODES nodes.
The alias bound is checked on YAML's node graph, where an alias is one shared node, before any
Python object is built: a "billion laughs" document costs what its file costs, never its
expansion, and a document that refers to itself is refused as such. Files are opened only once
`paths.regular_file` says they are one (a FIFO would block the read).

Writing: `update_json(path, change)` rewrites a JSON object file (an output's config.json) in place;
`dump_json(value, where)` refuses NaN and infinities (JSON has no such numbers, and a
config holding one would be read back as something else), naming the field. What the values must
be is `adaptkit.validate`'s part.
"""
from __future__ import annotations

import re

import codecs
import json
import math
from pathlib import Path
from typing import Any, Callable

from ..errors import AdaptkitError, short
from .paths import regular_file

#: Deepest nesting accepted in a config, recipe or record (real ones nest fewer than 10 levels).
MAX_DEPTH = 64
#: Most nodes a YAML document may have once its aliases are expanded.
MAX_NODES = 100_000

_LOADER: type | None = None  # the bounded YAML loader class, built on first use


# -- text ------------------------------------------------------------------------------------------
def decode(data: bytes, where: str | Path, *, line: int = 1) -> str:
    """`data` as UTF-8 text (a leading byte-order mark dropped), else one line naming file:line;
    `line` is the file line `data` starts on."""
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        row = line + data.count(b"\n", 0, e.start)
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise AdaptkitError(f"{where}:{row}: not UTF-8 text (byte {column} of the line)") from None


def _depth(value: Any) -> int:
    """How deeply lists and mappings nest in `value` (walked without recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        if level <= MAX_DEPTH:
            stack.extend((child, level + 1) for child in children)
    return deepest


# -- JSON ------------------------------------------------------------------------------------------
class DuplicateKey(Exception):
    """A JSON object naming a key twice (json.loads would keep the last one silently)."""


def unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """json's `object_pairs_hook` that raises DuplicateKey(key) for a key given twice."""
    found = {}
    for key, value in pairs:
        if key in found:
            raise DuplicateKey(key)
        found[key] = value
    return found


def parse_json(text: str, where: str | Path, *, line: int | None = None) -> Any:
    """One JSON value from `text`; `line` is the file line `text` starts on (for the message)."""
    first = str(where) if line is None else f"{where}:{line}"
    try:
        value = json.loads(text, object_pairs_hook=unique_keys)
    except DuplicateKey as e:
        raise AdaptkitError(f"{first}: duplicate key {short(e.args[0])}") from None
    except json.JSONDecodeError as e:
        row = e.lineno if line is None else line + e.lineno - 1
        raise AdaptkitError(f"{where}:{row}: not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise AdaptkitError(f"{first}: nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise AdaptkitError(f"{first}: not valid JSON ({_reason(e)})") from None
    if _depth(value) > MAX_DEPTH:
        raise AdaptkitError(f"{first}: nested more than {MAX_DEPTH} levels deep")
    return value


def _reason(e: Exception) -> str:
    """The gist of a parser's message: its first clause, without the value it quotes."""
    return str(e).splitlines()[0].split(":")[0][:80]


def read_json(path: str | Path) -> dict:
    """The JSON object in the file `path` (UTF-8, nesting bounded); anything else is one line."""
    path = _regular(path)
    value = parse_json(decode(path.read_bytes(), path), path)
    if not isinstance(value, dict):
        raise AdaptkitError(f"{path}: expected a JSON object, found {json_kind(value)}")
    return value


def _regular(path: str | Path) -> Path:
    """`path` if it is a regular file: a FIFO or device is refused before any blocking read."""
    return regular_file(path)


def json_kind(value: Any) -> str:
    """What a parsed JSON value is, for messages ("a list", "null", ...)."""
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null"}
    return kinds.get(type(value), "a number")


def update_json(path: Path, change: Callable[[dict], bool | None]) -> None:
    """The JSON object file `path` rewritten with `change` applied to it in place; nothing where the file is
    absent or `change` returns False (it changed nothing)."""
    if not path.is_file():
        return
    value = read_json(path)
    if change(value) is not False:
        path.write_text(dump_json(value, path.name))


def dump_json(value: Any, where: str | Path, *, end: str = "\n") -> str:
    """JSON text (indented, sorted keys, then `end`) for a file we write; NaN/inf refused by name."""
    try:
        return json.dumps(value, indent=2, sort_keys=True, allow_nan=False) + end
    except ValueError:
        field = _nonfinite(value) or "a value"
        raise AdaptkitError(f"{where}: {field} is not a finite number; JSON cannot hold it") from None


def _nonfinite(value: Any, name: str = "") -> str | None:
    """The dotted name of the first NaN or infinite number in `value`, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"'{name}' ({value})" if name else str(value)
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        found = _nonfinite(item, f"{name}.{key}" if name else str(key))
        if found:
            return found
    return None


# -- YAML ------------------------------------------------------------------------------------------
def read_yaml(path: str | Path) -> Any:
    """The one YAML document in the file `path`, read safely (see the module docstring)."""
    path = _regular(path)
    return load_yaml(decode(path.read_bytes(), path), path)


def read_yaml_documents(path: str | Path) -> list[Any]:
    """Every YAML document in the file `path`, in order, each checked as `read_yaml` checks one."""
    path = _regular(path)
    return load_yaml(decode(path.read_bytes(), path), path, documents=True)


def load_yaml(text: str, where: str | Path, *, documents: bool = False) -> Any:
    """One YAML document from `text` (with `documents`, the list of all of them) with yaml.SafeLoader's
    types; nesting, aliases and duplicate keys bounded as the module docstring says. `where` names the
    source in messages."""
    import yaml

    try:
        return _load(text, where, documents)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise AdaptkitError(f"{where}{line}: not valid YAML ({e.problem or e.context})") from None
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        raise AdaptkitError(f"{where}:{line}: not valid YAML (character #x{e.character:04x} is not allowed)") from None
    except yaml.YAMLError as e:
        raise AdaptkitError(f"{where}: not valid YAML ({_reason(e)})") from None
    except ValueError as e:  # a scalar its type cannot hold: a 5000-digit integer, a 13th month
        raise AdaptkitError(f"{where}: not valid YAML ({_reason(e)})") from None


def _load(text: str, where: str | Path, documents: bool = False) -> Any:
    """Compose the node graph, check it (`_check_graph`), and only then build Python objects."""
    loader = _loader()(text)  # the reader refuses control characters here
    try:
        if not documents:
            node = loader.get_single_node()
            nodes = [] if node is None else [node]
        else:
            nodes = []
            while loader.check_node():  # each document's anchors are its own (the composer resets them)
                nodes.append(loader.get_node())
        for node in nodes:
            _check_graph(node, where)
        values = [loader.construct_document(node) for node in nodes]
        return values if documents else (values[0] if values else None)
    finally:
        loader.dispose()


def _loader() -> type:
    """yaml.SafeLoader that refuses nesting deeper than MAX_DEPTH while it composes (PyYAML composes
    recursively, so this also keeps it far from Python's recursion limit)."""
    global _LOADER
    if _LOADER is None:
        import yaml

        class BoundedLoader(yaml.SafeLoader):
            depth = 0

            def compose_node(self, parent, index):
                if self.depth >= MAX_DEPTH:
                    raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_DEPTH} levels deep",
                                                      self.peek_event().start_mark)
                self.depth += 1
                try:
                    return super().compose_node(parent, index)
                finally:
                    self.depth -= 1

        # YAML 1.1 (PyYAML) reads 1e-5 as a string: its floats need a dot. mergekit's recipes and docs write
        # tolerances so (pydantic turns them into numbers there), so a dot-less exponent is a float here too.
        BoundedLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                                            list("-+0123456789"))
        _LOADER = BoundedLoader
    return _LOADER


def _check_graph(root, where: str | Path) -> None:
    """Refuse a node graph whose expansion exceeds MAX_NODES, that refers to itself, or that has a
    duplicate mapping key. Nodes are shared where the file has aliases, so sizes are memoized."""
    import yaml

    size: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        children = _children(node)
        if done:
            open_nodes.discard(key)
            size[key] = min(MAX_NODES + 1, 1 + sum(size[id(c)] for c in children))
            if size[key] > MAX_NODES:
                raise AdaptkitError(f"{where}:{node.start_mark.line + 1}: its aliases expand to more than "
                                    f"{MAX_NODES} nodes; refused before expanding them")
            continue
        if key in size:
            continue
        if key in open_nodes:
            raise AdaptkitError(f"{where}:{node.start_mark.line + 1}: an alias refers to a node that contains it")
        if isinstance(node, yaml.MappingNode):
            _check_keys(node, where)
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in size)


def _children(node) -> list:
    import yaml

    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_keys(node, where: str | Path) -> None:
    import yaml

    seen = set()
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
            continue
        if (key.tag, key.value) in seen:
            raise AdaptkitError(f"{where}:{key.start_mark.line + 1}: duplicate key {short(key.value)}")
        seen.add((key.tag, key.value))
