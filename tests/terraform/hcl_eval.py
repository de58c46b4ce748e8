"""Evaluate the subset of HCL the kmskeys modules use, straight from the .tf files.

No terraform binary can run here, so the tests read the real module source with python-hcl2's
parser and evaluate it: variables (defaults plus given inputs), locals, conditionals, for
expressions, the functions listed in FUNCTIONS, and `aws_iam_policy_document` data sources
rendered to policy JSON the way the AWS provider renders them. Anything only known after apply
(resource attributes, data sources other than policy documents) becomes a `Ref`, unless the test
supplies a value for it in `known`. Constructs outside the subset raise `Unsupported`, so a
module that outgrows the evaluator fails its tests instead of being checked half-way.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hcl2
import yaml
from lark import Token, Tree


class Unsupported(Exception):
    """The module uses HCL the evaluator does not implement; extend the evaluator."""


@dataclass(frozen=True)
class Ref:
    """A value known only after apply, e.g. aws_iam_role.this.arn."""

    path: str

    def attr(self, name: str) -> Ref:
        return Ref(f"{self.path}.{name}")

    def __str__(self) -> str:
        return "${" + self.path + "}"


@dataclass
class Block:
    """A block as parsed: its type, labels and body (attributes unevaluated)."""

    type: str
    labels: list[str]
    attributes: dict[str, Tree[Any]]
    blocks: list[Block]
    file: Path

    def children(self, type_: str) -> list[Block]:
        return [b for b in self.blocks if b.type == type_]


def _name(node: Tree[Any] | Token) -> str:
    """The text of an identifier, keyword or literal used as a name."""
    if isinstance(node, Token):
        return str(node)
    tokens = list(node.scan_values(lambda t: isinstance(t, Token)))
    return str(tokens[0])


def _string_label(node: Tree[Any]) -> str:
    parts = [c for c in node.children if isinstance(c, Tree) and c.data == "string_part"]
    out = []
    for part in parts:
        token = part.children[0]
        if not isinstance(token, Token):
            raise Unsupported("interpolation in a block label")
        out.append(str(token))
    return "".join(out)


def _parse_body(body: Tree[Any], file: Path) -> tuple[dict[str, Tree[Any]], list[Block]]:
    attributes: dict[str, Tree[Any]] = {}
    blocks: list[Block] = []
    for child in body.children:
        if not isinstance(child, Tree):
            continue
        if child.data == "attribute":
            key = _name(child.children[0])
            attributes[key] = child.children[-1]
        elif child.data == "block":
            parts = [c for c in child.children if isinstance(c, Tree)]
            inner = next(c for c in parts if c.data == "body")
            head = [c for c in parts if c.data not in {"body", "new_line_or_comment"}]
            type_ = _name(head[0])
            labels = [_string_label(h) if h.data == "string" else _name(h) for h in head[1:]]
            attrs, sub = _parse_body(inner, file)
            blocks.append(Block(type_, labels, attrs, sub, file))
    return attributes, blocks


def parse_file(path: Path) -> list[Block]:
    """Top-level blocks of one .tf file."""
    tree = hcl2.parses_to_tree(path.read_text())
    body = next(c for c in tree.children if isinstance(c, Tree) and c.data == "body")
    _, blocks = _parse_body(body, path)
    return blocks


def _unquote(raw: str) -> str:
    """Resolve HCL escapes in a quoted-string fragment."""
    return json.loads('"' + raw.replace("\t", "\\t") + '"')


def _jsonencode(value: Any) -> str:
    return json.dumps(_plain(value), separators=(",", ":"))


def _plain(value: Any) -> Any:
    if isinstance(value, Ref):
        return str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _distinct(values: list[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def _flatten(values: list[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        out.extend(_flatten(v) if isinstance(v, list) else [v])
    return out


def _merge(*maps: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in maps:
        out.update(m)
    return out


def _regex(pattern: str, text: str) -> str:
    # Terraform's regex() fails when nothing matches; the patterns used here are plain RE2
    # that Python's re reads the same way.
    match = re.search(pattern, text)
    if match is None:
        raise ValueError(f"regex {pattern!r} does not match")
    return match.group(0)


def _setintersection(first: list[Any], *rest: list[Any]) -> list[Any]:
    return [v for v in _distinct(first) if all(v in r for r in rest)]


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "alltrue": all,
    "anytrue": any,
    "base64encode": lambda s: base64.b64encode(s.encode()).decode(),
    "compact": lambda xs: [x for x in xs if x not in ("", None)],
    "concat": lambda *xs: [v for x in xs for v in x],
    "contains": lambda xs, v: v in xs,
    "distinct": _distinct,
    "endswith": lambda s, suffix: s.endswith(suffix),
    "flatten": _flatten,
    "join": lambda sep, xs: sep.join(xs),
    "jsonencode": _jsonencode,
    "keys": sorted,
    "length": len,
    "lower": lambda s: s.lower(),
    "merge": _merge,
    "regex": _regex,
    "setintersection": _setintersection,
    "startswith": lambda s, prefix: s.startswith(prefix),
    "tolist": list,
    "toset": _distinct,
    "upper": lambda s: s.upper(),
    "values": lambda m: [m[k] for k in sorted(m)],
    # Terraform's YAML layout differs; the tests read it back as YAML, never as text.
    "yamlencode": lambda v: yaml.safe_dump(_plain(v), sort_keys=False),
}

_BINARY: dict[str, Callable[[Any, Any], Any]] = {
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    ">": lambda a, b: a > b,
    "<=": lambda a, b: a <= b,
    ">=": lambda a, b: a >= b,
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a / b,
    "%": lambda a, b: a % b,
    "&&": lambda a, b: a and b,
    "||": lambda a, b: a or b,
}


@dataclass
class Module:
    """One Terraform module directory, evaluated for one set of inputs."""

    path: Path
    inputs: dict[str, Any] = field(default_factory=dict)
    known: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.files = sorted(self.path.glob("*.tf"))
        self.blocks = [b for f in self.files for b in parse_file(f)]
        self._locals: dict[str, Tree[Any]] = {}
        for block in self.blocks:
            if block.type == "locals":
                self._locals.update(block.attributes)
        self._local_values: dict[str, Any] = {}
        self._var_values: dict[str, Any] = {}
        unknown = set(self.inputs) - set(self.variables())
        if unknown:
            raise KeyError(f"{self.path.name}: no such variables: {sorted(unknown)}")

    # --- structure ---------------------------------------------------------------------------

    def of_type(self, type_: str) -> list[Block]:
        return [b for b in self.blocks if b.type == type_]

    def variables(self) -> dict[str, Block]:
        return {b.labels[0]: b for b in self.of_type("variable")}

    def outputs(self) -> dict[str, Block]:
        return {b.labels[0]: b for b in self.of_type("output")}

    def resource(self, type_: str, name: str) -> Block:
        for b in self.of_type("resource"):
            if b.labels == [type_, name]:
                return b
        raise KeyError(f"{self.path.name}: no resource {type_}.{name}")

    def data(self, type_: str, name: str) -> Block:
        for b in self.of_type("data"):
            if b.labels == [type_, name]:
                return b
        raise KeyError(f"{self.path.name}: no data {type_}.{name}")

    # --- values ------------------------------------------------------------------------------

    def var(self, name: str) -> Any:
        if name not in self._var_values:
            block = self.variables().get(name)
            if block is None:
                raise KeyError(f"{self.path.name}: var.{name} is not declared")
            if name in self.inputs:
                self._var_values[name] = self.inputs[name]
            elif "default" in block.attributes:
                self._var_values[name] = self.eval(block.attributes["default"])
            else:
                raise KeyError(f"{self.path.name}: var.{name} is required and not given")
        return self._var_values[name]

    def local(self, name: str) -> Any:
        if name not in self._local_values:
            if name not in self._locals:
                raise KeyError(f"{self.path.name}: local.{name} is not defined")
            self._local_values[name] = self.eval(self._locals[name])
        return self._local_values[name]

    def body(self, block: Block, scope: dict[str, Any] | None = None) -> dict[str, Any]:
        """Evaluate a block: attributes by name, nested blocks (dynamic ones expanded) as lists."""
        scope = scope or {}
        out: dict[str, Any] = {k: self.eval(v, scope) for k, v in block.attributes.items()}
        for child in block.blocks:
            if child.type == "dynamic":
                kind = child.labels[0]
                iterator = kind
                if "iterator" in child.attributes:
                    iterator = _name(child.attributes["iterator"])
                items = self.eval(child.attributes["for_each"], scope)
                pairs = items.items() if isinstance(items, dict) else enumerate(items)
                (content,) = child.children("content")
                for key, value in pairs:
                    inner = {**scope, iterator: {"key": key, "value": value}}
                    out.setdefault(kind, []).append(self.body(content, inner))
            elif child.type in ("lifecycle", "validation"):
                continue
            else:
                out.setdefault(child.type, []).append(self.body(child, scope))
        return out

    def policy(self, name: str) -> dict[str, Any]:
        """The document of `data "aws_iam_policy_document" NAME`, as the provider renders it."""
        block = self.data("aws_iam_policy_document", name)
        for unsupported in ("source_policy_documents", "override_policy_documents", "policy_id"):
            if unsupported in block.attributes:
                raise Unsupported(f"aws_iam_policy_document {unsupported}")
        statements = [_statement(s) for s in self.body(block).get("statement", [])]
        return {"Version": "2012-10-17", "Statement": statements}

    def eval(self, node: Tree[Any] | Token, scope: dict[str, Any] | None = None) -> Any:
        """Evaluate one expression node."""
        return _Evaluator(self, scope or {}).eval(node)

    def reference(self, parts: list[str], scope: dict[str, Any]) -> Any:
        """Resolve a traversal such as var.x, local.y, data.T.N.json or aws_iam_role.this.arn."""
        head = parts[0]
        if head in scope:
            value = scope[head]
            for p in parts[1:]:
                value = value[p]
            return value
        if head == "var":
            return _walk(self.var(parts[1]), parts[2:])
        if head == "local":
            return _walk(self.local(parts[1]), parts[2:])
        if head == "data" and parts[1] == "aws_iam_policy_document" and parts[3:] == ["json"]:
            return json.dumps(self.policy(parts[2]), indent=2)
        joined = ".".join(parts)
        if joined in self.known:
            return self.known[joined]
        return Ref(joined)


def _walk(value: Any, parts: list[str]) -> Any:
    for p in parts:
        value = value.attr(p) if isinstance(value, Ref) else value[p]
    return value


def _statement(raw: dict[str, Any]) -> dict[str, Any]:
    """One policy statement as the provider renders a `statement` block."""
    out: dict[str, Any] = {}
    if "sid" in raw:
        out["Sid"] = raw["sid"]
    out["Effect"] = raw.get("effect", "Allow")
    for hcl_key, json_key in (
        ("actions", "Action"),
        ("not_actions", "NotAction"),
        ("resources", "Resource"),
        ("not_resources", "NotResource"),
    ):
        if hcl_key in raw:
            out[json_key] = [_plain(v) for v in raw[hcl_key]]
    for hcl_key, json_key in (("principals", "Principal"), ("not_principals", "NotPrincipal")):
        if hcl_key in raw:
            principal: dict[str, list[Any]] = {}
            for p in raw[hcl_key]:
                principal.setdefault(p["type"], []).extend(_plain(p["identifiers"]))
            out[json_key] = principal
    if "condition" in raw:
        condition: dict[str, dict[str, list[Any]]] = {}
        for c in raw["condition"]:
            values = condition.setdefault(c["test"], {}).setdefault(c["variable"], [])
            values.extend(_plain(c["values"]))
        out["Condition"] = condition
    return out


class _Evaluator:
    def __init__(self, module: Module, scope: dict[str, Any]):
        self.module = module
        self.scope = scope

    def eval(self, node: Tree[Any] | Token) -> Any:
        if isinstance(node, Token):
            raise Unsupported(f"bare token {node.type}")
        handler = getattr(self, "_" + node.data, None)
        if handler is None:
            raise Unsupported(f"HCL expression '{node.data}'")
        return handler(node)

    def _trees(self, node: Tree[Any]) -> list[Tree[Any]]:
        return [c for c in node.children if isinstance(c, Tree) and c.data != "new_line_or_comment"]

    def _expr_term(self, node: Tree[Any]) -> Any:
        (inner,) = self._trees(node)
        return self.eval(inner)

    def _int_lit(self, node: Tree[Any]) -> int:
        return int(node.children[0])

    def _float_lit(self, node: Tree[Any]) -> float:
        return float(node.children[0])

    def _literal_value(self, node: Tree[Any]) -> Any:
        return {"true": True, "false": False, "null": None}[str(node.children[0])]

    def _string(self, node: Tree[Any]) -> Any:
        pieces: list[Any] = []
        for part in self._trees(node):
            (inner,) = part.children
            if isinstance(inner, Token):
                if inner.type != "STRING_CHARS":
                    raise Unsupported(f"string part {inner.type}")
                pieces.append(_unquote(str(inner)))
            elif inner.data == "interpolation":
                pieces.append(self.eval(self._trees(inner)[0]))
            else:
                raise Unsupported(f"template directive {inner.data}")
        if len(pieces) == 1 and not isinstance(pieces[0], str):
            return pieces[0]
        return "".join(str(p) for p in pieces)

    def _tuple(self, node: Tree[Any]) -> list[Any]:
        return [self.eval(c) for c in self._trees(node)]

    def _object(self, node: Tree[Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for elem in self._trees(node):
            key_node, value_node = self._trees(elem)
            (key_expr,) = self._trees(key_node)
            inner = self._trees(key_expr)
            if key_expr.data == "expr_term" and inner and inner[0].data == "identifier":
                key = _name(inner[0])
            else:
                key = self.eval(key_expr)
            out[str(key)] = self.eval(value_node)
        return out

    def _identifier(self, node: Tree[Any]) -> Any:
        return self.module.reference([_name(node)], self.scope)

    def _traversal(self, node: Tree[Any]) -> list[str] | None:
        """The dotted name of a plain traversal (a.b.c, with [N] indices), or None."""
        if node.data == "expr_term":
            (inner,) = self._trees(node)
            return self._traversal(inner)
        if node.data == "identifier":
            return [_name(node)]
        if node.data == "get_attr_expr_term":
            base, attr = self._trees(node)
            head = self._traversal(base)
            return None if head is None else [*head, _name(self._trees(attr)[0])]
        return None

    def _get_attr_expr_term(self, node: Tree[Any]) -> Any:
        path = self._traversal(node)
        if path is not None:
            return self.module.reference(path, self.scope)
        base, attr = self._trees(node)
        return _walk(self.eval(base), [_name(self._trees(attr)[0])])

    def _index_expr_term(self, node: Tree[Any]) -> Any:
        base_node, index = self._trees(node)
        base = self.eval(base_node)
        if index.data == "braces_index":
            key = self.eval(self._trees(index)[0])
        else:
            key = int(str(index.children[-1]))
        if isinstance(base, Ref):
            return Ref(f"{base.path}[{key}]")
        return base[key]

    def _function_call(self, node: Tree[Any]) -> Any:
        trees = self._trees(node)
        name = _name(trees[0])
        args_node = trees[1] if len(trees) > 1 else None
        arg_nodes = self._trees(args_node) if args_node is not None else []
        if args_node is not None and any(
            isinstance(c, Token) and c.type == "ELLIPSIS" for c in args_node.children
        ):
            raise Unsupported("argument expansion (...)")
        if name == "try":
            for arg in arg_nodes:
                try:
                    return self.eval(arg)
                except (KeyError, IndexError, TypeError):
                    continue
            raise ValueError("try(): no argument evaluated")
        if name == "can":
            try:
                self.eval(arg_nodes[0])
            except (KeyError, IndexError, TypeError, ValueError):
                return False
            return True
        if name not in FUNCTIONS:
            raise Unsupported(f"function {name}()")
        return FUNCTIONS[name](*[self.eval(a) for a in arg_nodes])

    def _conditional(self, node: Tree[Any]) -> Any:
        cond, yes, no = self._trees(node)
        return self.eval(yes) if self.eval(cond) else self.eval(no)

    def _binary_op(self, node: Tree[Any]) -> Any:
        left, term = self._trees(node)
        operator, right = self._trees(term)
        op = str(operator.children[0])
        a = self.eval(left)
        if op == "&&" and not a:
            return False
        if op == "||" and a:
            return True
        return _BINARY[op](a, self.eval(right))

    def _unary_op(self, node: Tree[Any]) -> Any:
        op = str(node.children[0])
        value = self.eval(self._trees(node)[0])
        return (not value) if op == "!" else -value

    def _for_tuple_expr(self, node: Tree[Any]) -> list[Any]:
        intro, *rest = self._trees(node)
        body, cond = rest[0], rest[1] if len(rest) > 1 else None
        return [self._in(s, body) for s in self._iterate(intro) if self._keep(s, cond)]

    def _for_object_expr(self, node: Tree[Any]) -> dict[str, Any]:
        intro, key, value, *rest = self._trees(node)
        if any(isinstance(c, Token) and c.type == "ELLIPSIS" for c in node.children):
            raise Unsupported("grouping for expression (...)")
        cond = rest[0] if rest else None
        return {
            self._in(s, key): self._in(s, value)
            for s in self._iterate(intro)
            if self._keep(s, cond)
        }

    def _iterate(self, intro: Tree[Any]) -> Iterator[dict[str, Any]]:
        names = [_name(c) for c in self._trees(intro) if c.data == "identifier"]
        (collection_node,) = [c for c in self._trees(intro) if c.data != "identifier"]
        collection = self.eval(collection_node)
        pairs = collection.items() if isinstance(collection, dict) else enumerate(collection)
        for k, v in pairs:
            if len(names) == 1:
                yield {**self.scope, names[0]: v}
            else:
                yield {**self.scope, names[0]: k, names[1]: v}

    def _in(self, scope: dict[str, Any], node: Tree[Any]) -> Any:
        return _Evaluator(self.module, scope).eval(node)

    def _keep(self, scope: dict[str, Any], cond: Tree[Any] | None) -> bool:
        if cond is None:
            return True
        return bool(self._in(scope, self._trees(cond)[0]))
