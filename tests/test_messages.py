"""Library messages name Python parameters (``batch_size=0: ...``), never command-line flags.

Only hybridcls/cli/ speaks of flags: the command line rewrites each ``name=value`` of a
library message into the flag that sets it (:func:`hybridcls.cli.common.flag_message`).
A flag written into a library message would reach Python users as it is, and users of
a subcommand that spells the option otherwise wrongly. The scan reads the texts of
every message: the arguments of ``raise``, of exception constructors and of
``warnings.warn``, the variables and lists they are built from, and what callers pass
to the parameters of functions that build messages (``hint=``, ``need(ok, message)``).
The command line's side, each message as its users read it, is tested in
tests/test_cli_messages.py.
"""

from __future__ import annotations

import ast
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path

import hybridcls

PACKAGE = Path(hybridcls.__file__).parent
# A flag, or the prefix that a flag is built from ("--" + name).
FLAG = re.compile(r"(?<![\w-])--(?:[a-z]|$)")
# (file relative to hybridcls/, text) pairs whose "--" is not a flag, each with the reason
# in a comment. None so far: argv that the library builds for a child command (bench
# memory, train --nproc through torchrun) is not a message, and is not scanned.
NOT_FLAGS: frozenset[tuple[str, str]] = frozenset()

_SINK_SUFFIXES = ("Error", "Warning", "Exception")
_LIST_METHODS = ("append", "extend", "insert")
# A function whose parameter goes into a message: (name, class of a method or None, parameter,
# position as callers pass it or -1); a class's __init__ is called by the class's name.
Builder = tuple[str, "str | None", str, int]


def _callee(call: ast.Call) -> str | None:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


def _texts(node: ast.AST) -> Iterator[tuple[int, str]]:
    """The string constants in ``node``, f-strings' literal parts included."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
            yield sub.lineno, sub.value


class _Scope:
    """A function (or the module): its own nodes, parameters and variables, for following names."""

    def __init__(self, node: ast.AST, parent: _Scope | None, cls: str | None) -> None:
        self.node, self.parent = node, parent
        fn = node if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
        self.name = fn.name if fn else ""
        self.cls = cls  # the class of a method (None: a function, the module, an __init__)
        self.home = cls or (parent.home if parent else None)  # the class its code is in
        self.exception_class = bool(cls and cls.endswith(_SINK_SUFFIXES))
        if fn is not None and fn.name == "__init__" and cls:
            self.name, self.cls = cls, None
        self.params: list[str] = []
        self.positional: list[str] = []  # as callers pass them: without self / cls
        self.defaults: dict[str, ast.AST] = {}
        if fn is not None:
            a = fn.args
            positional = [p.arg for p in a.posonlyargs + a.args]
            self.params = positional + [p.arg for p in a.kwonlyargs]
            self.positional = [p for p in positional if p not in ("self", "cls")]
            self.defaults = dict(zip(positional[len(positional) - len(a.defaults):], a.defaults))
            self.defaults.update({p.arg: d for p, d in zip(a.kwonlyargs, a.kw_defaults) if d})
        self.nodes: list[ast.AST] = []  # the nodes whose innermost function this is
        self.assigned: dict[str, list[ast.AST]] = {}

    def index_variables(self) -> None:
        """What each variable is assigned, or appended to it (a list of message parts)."""
        for n in self.nodes:
            targets = (n.targets if isinstance(n, ast.Assign)
                       else [n.target] if isinstance(n, (ast.AugAssign, ast.AnnAssign)) else [])
            for t in targets:
                if isinstance(t, ast.Name) and n.value is not None:
                    self.assigned.setdefault(t.id, []).append(n.value)
            if (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                    and n.func.attr in _LIST_METHODS and isinstance(n.func.value, ast.Name)):
                self.assigned.setdefault(n.func.value.id, []).extend(n.args)

    def lookup(self, name: str) -> _Scope | None:
        """The innermost scope that defines ``name``."""
        scope: _Scope | None = self
        while scope is not None and name not in scope.assigned and name not in scope.params:
            scope = scope.parent
        return scope

    def calls(self, builder: Builder) -> Iterator[ast.Call]:
        """This scope's calls of ``builder``: by name, a method through its class or self."""
        name, cls = builder[0], builder[1]
        for n in self.nodes:
            if not isinstance(n, ast.Call) or _callee(n) != name:
                continue
            if cls is None or (
                    isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name)
                    and (n.func.value.id == cls
                         or (n.func.value.id in ("self", "cls") and self.home == cls))):
                yield n


def _scopes(tree: ast.Module) -> list[_Scope]:
    scopes = [_Scope(tree, None, None)]

    def visit(node: ast.AST, scope: _Scope, cls: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                scopes.append(_Scope(child, scope, cls))
                visit(child, scopes[-1], None)
            else:
                scope.nodes.append(child)
                visit(child, scope, child.name if isinstance(child, ast.ClassDef) else None)

    visit(tree, scopes[0], None)
    for s in scopes:
        s.index_variables()
    return scopes


def _sinks(scope: _Scope) -> Iterator[ast.AST]:
    """The expressions of ``scope`` that become a message."""
    for n in scope.nodes:
        if isinstance(n, ast.Raise) and n.exc is not None:
            yield n.exc
        elif isinstance(n, ast.Call):
            name = _callee(n)
            if name == "warn" or (name and name.endswith(_SINK_SUFFIXES)):
                yield from n.args
                yield from (k.value for k in n.keywords)
            elif (name == "__init__" and scope.exception_class
                  and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Call)):
                yield from n.args  # super().__init__(message) of an exception class


def _follow(scope: _Scope, exprs: list[ast.AST], builders: set[Builder]) -> Iterator[tuple[int, str]]:
    """The texts of ``exprs`` and of the variables they read; the parameters they read go to
    ``builders`` (their callers' arguments are read next).

    An object's attribute (``child.returncode``) is not text built here, and a parameter
    of which the message shows an item (``argv[:1]``) does not make all of the callers'
    value message text; a local list's items (``problems[:5]``) are message parts.
    """
    seen: set[tuple[int, str, bool]] = set()
    todo = [(scope, e) for e in exprs]
    while todo:
        sc, expr = todo.pop()
        yield from _texts(expr)
        objects = {id(n.value) for n in ast.walk(expr) if isinstance(n, ast.Attribute)}
        items = {id(n.value) for n in ast.walk(expr) if isinstance(n, ast.Subscript)}
        for n in ast.walk(expr):
            if not isinstance(n, ast.Name) or id(n) in objects or n.id in ("self", "cls"):
                continue
            key = (id(sc), n.id, id(n) in items)
            owner = sc.lookup(n.id)
            if key in seen or owner is None:
                continue
            seen.add(key)
            todo += [(owner, v) for v in owner.assigned.get(n.id, [])]
            if n.id in owner.params and id(n) not in items:
                if n.id in owner.defaults:
                    todo.append((owner, owner.defaults[n.id]))
                pos = owner.positional.index(n.id) if n.id in owner.positional else -1
                builders.add((owner.name, owner.cls, n.id, pos))


def message_texts(files: dict[str, str]) -> list[tuple[str, int, str]]:
    """``(file, line, text)`` of every message text in ``files`` (name -> source)."""
    scopes = {name: _scopes(ast.parse(src)) for name, src in files.items()}
    out: set[tuple[str, int, str]] = set()
    builders: set[Builder] = set()
    for name, module_scopes in scopes.items():
        for sc in module_scopes:
            out.update((name, line, text) for line, text in _follow(sc, list(_sinks(sc)), builders))
    done: set[Builder] = set()
    while builders - done:
        builder = (builders - done).pop()
        done.add(builder)
        param, pos = builder[2], builder[3]
        for name, module_scopes in scopes.items():
            for sc in module_scopes:
                for call in sc.calls(builder):
                    args = [k.value for k in call.keywords if k.arg == param]
                    if 0 <= pos < len(call.args) and not any(
                            isinstance(a, ast.Starred) for a in call.args[:pos + 1]):
                        args.append(call.args[pos])
                    out.update((name, line, text) for line, text in _follow(sc, args, builders))
    return sorted(out)


def _library_files() -> dict[str, str]:
    return {p.relative_to(PACKAGE).as_posix(): p.read_text(encoding="utf-8")
            for p in sorted(PACKAGE.rglob("*.py")) if p.relative_to(PACKAGE).parts[0] != "cli"}


def test_library_messages_name_parameters_not_flags():
    texts = message_texts(_library_files())
    flags = [f"hybridcls/{f}:{line}: {text!r}" for f, line, text in texts
             if FLAG.search(text) and (f, text) not in NOT_FLAGS]
    assert flags == []
    # the scan reads the package's messages: some of every kind it follows
    found = {text for _, _, text in texts}
    assert len(texts) > 500
    assert "must be >= 1" in found  # ParameterError("nproc", nproc, "must be >= 1")
    assert " rows (rerun it with resume=True)" in found  # problems.append(...) in merge_parts
    # torchrun_world(hint=...)
    assert "start distributed training with torchrun (or `hybridcls train` with nproc=N)" in found
    assert "shard" in found  # ShardSpec.parse(text, parameter="shard"): a default
    assert "allow_missing=True" in found  # MissingPredictionsError(allow=...): super().__init__


def test_the_scan_finds_a_flag_in_every_kind_of_message():
    source = textwrap.dedent('''
        import warnings

        class BadError(ValueError):
            def __init__(self, allow="--a1"):
                super().__init__(f"bad; {allow}")

        def check(x, hint="--a2"):
            if x:
                raise ValueError(f"--a3 {x}: {hint}")
            warnings.warn("--a4 is slow")
            msg = "first"
            msg += " --a5 DIR"
            problems = []
            problems.append(f"part {x} (rerun it with --a6)")
            flag = "--" + "a7"
            if problems:
                raise ValueError(f"{msg}: " + "; ".join(problems[:5]) + flag)
            return BadError("--a8")

        def need(ok, message):
            if not ok:
                raise ValueError(message)

        def caller():
            need(False, "--a9 must be > 0")
            check(1, hint="use --a10")

        def run(argv):
            raise RuntimeError(f"{argv[:1]} failed")  # shows the command's name only

        def not_a_message():
            run(["predict", "--b1"])  # argv, not a message
            return ["--b2"]
        ''')
    hits = {text for _, _, text in message_texts({"m.py": source}) if FLAG.search(text)}
    assert hits == {"--a1", "--a2", "--a3 ", "--a4 is slow", " --a5 DIR", " (rerun it with --a6)",
                    "--", "--a8", "--a9 must be > 0", "use --a10"}
