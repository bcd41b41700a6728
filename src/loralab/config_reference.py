"""docs/config.md, generated from the config dataclasses and the comments beside their fields, so that the
reference cannot drift from the code (a test fails when the file is stale):

    python -m loralab.config_reference > docs/config.md
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import types
import typing
from typing import Literal

from loralab.config import RunConfig

HEADER = """# Configuration reference

Every key of a run's YAML config, with its type, default and meaning. Keys are given in sections (`lora.r`) and
can be set on the command line as dotted overrides: `loralab train run.yaml lora.r=16 train.lr=1e-4`. An unknown
key or a value of the wrong type or out of range is refused with the key named and a fix.

This file is generated: `python -m loralab.config_reference > docs/config.md`.
"""


def field_comments(cls) -> dict[str, str]:
    """Each field's comment: the comment lines right above it and the comment at the end of its line."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    lines = source.splitlines()
    out = {}
    for node in ast.parse(source).body[0].body:
        if not isinstance(node, ast.AnnAssign):
            continue
        above, line = [], node.lineno - 1
        while line >= 1 and lines[line - 1].strip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        trailing = comments.get(node.end_lineno)
        out[node.target.id] = " ".join([*above, *([trailing] if trailing else [])])
    return out


def type_name(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return " \\| ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_name(a) for a in args)
    if origin is list:
        return f"list of {type_name(args[0])}"
    if origin is dict:
        return "mapping"
    return getattr(hint, "__name__", str(hint))


def default_text(f: dataclasses.Field) -> str:
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if value == "" or value == {} or value == []:
        return "(none)" if value == "" else str(value)
    return str(value)


def range_text(f: dataclasses.Field) -> str:
    if "range" not in f.metadata:
        return ""
    low, high, low_open, high_open = f.metadata["range"]
    text = f"{'>' if low_open else '>='} {low}"
    return text + ("" if high is None else f", {'<' if high_open else '<='} {high}")


def section_table(cls, prefix: str) -> list[str]:
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            continue
        meaning = comments.get(f.name, "")
        limits = range_text(f)
        if limits:
            meaning = f"{meaning} (range: {limits})" if meaning else f"range: {limits}"
        meaning = meaning.replace("|", "\\|")
        rows.append(f"| `{prefix}{f.name}` | {type_name(hints[f.name])} | `{default_text(f)}` | {meaning} |")
    return rows


def render() -> str:
    parts = [HEADER, "## Top level", "", *section_table(RunConfig, "")]
    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        cls = hints[f.name]
        if dataclasses.is_dataclass(cls):
            doc = inspect.getdoc(cls) or ""
            summary = doc.split("\n\n")[0].replace("\n", " ") if doc and not doc.startswith(cls.__name__) else ""
            parts += ["", f"## {f.name}", "", *([summary, ""] if summary else []), *section_table(cls, f"{f.name}.")]
    return "\n".join(parts) + "\n"


def undocumented() -> list[str]:
    """Keys without a meaning in the code: each needs a comment beside its field."""
    missing = [f"{name}" for name, comment in field_comments(RunConfig).items()
               if not comment and not dataclasses.is_dataclass(typing.get_type_hints(RunConfig)[name])]
    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        if dataclasses.is_dataclass(hints[f.name]):
            missing += [f"{f.name}.{k}" for k, c in field_comments(hints[f.name]).items() if not c]
    return missing


if __name__ == "__main__":
    print(render(), end="")
