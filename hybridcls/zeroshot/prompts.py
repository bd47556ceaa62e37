"""Prompts files (the classes and what to say about them) and templates files.

A prompts file names one class per line::

    # comment
    grizzly bear
    moose: a large deer with broad flat antlers | elk
    bat: a flying mammal | fruit bat | flying fox
    red fox: a small orange canid | fox > canid > carnivore > mammal

``NAME[: DESCRIPTION][ | SYNONYM ...][ > ANCESTOR ...]``. A ``#`` at the start of a line or
after a space starts a comment; blank lines are ignored. The ancestors after ``>``,
nearest first, are coarser labels that :mod:`hybridcls.hierarchy` may answer
instead of the class when it is unsure (roll-up); they are not classes, and the
text encoder never sees them. A templates file has
one template per line, each with a ``{}`` where the class text goes.

Class names are compared after :func:`normalize_label` (case, ``_``, ``+``,
``-``, repeated spaces), so ``grizzly+bear``, ``Grizzly_Bear`` and
``grizzly bear`` are the same class; that is also how a training folder is
matched to its prompts line (:meth:`PromptSet.match`).

Each class reaches the text encoder as *phrases* (:func:`class_phrases`), each
put into every template; :mod:`hybridcls.zeroshot.text_checks` checks those
texts against the loaded model's context length.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TypeVar

from hybridcls.errors import PromptFileError

__all__ = [
    "DEFAULT_TEMPLATES_NAME",
    "PROMPTS_LIST",
    "TEMPLATES_LIST",
    "ClassPrompt",
    "PromptSet",
    "TemplateSet",
    "align_classes",
    "as_prompt_set",
    "as_template_set",
    "check_templates",
    "class_phrases",
    "format_prompt_line",
    "labelled_phrases",
    "normalize_label",
    "parse_prompts",
    "parse_templates",
    "read_prompts",
    "read_templates",
]

DEFAULT_TEMPLATES_NAME = "templates.txt"
#: The source messages name, with the item number as the line, for prompts and templates given
#: as a Python list (the command line's ``--classes`` is such a list: it names its flag instead).
PROMPTS_LIST = "<prompts list>"
TEMPLATES_LIST = "<templates list>"

T = TypeVar("T")

_SEPARATORS = re.compile(r"[\s_+\-]+")
# A '#' at the start or after whitespace opens a comment; '#' inside a word
# ("c#", "no.#3") is kept, since class names and descriptions may contain it.
_COMMENT = re.compile(r"(^|\s)#.*$")


def normalize_label(s: str) -> str:
    """The form under which two class names are considered the same.

    Case-folds and turns ``_``, ``+``, ``-`` and runs of whitespace into one
    space, so dataset spellings match readable names.

    Example:
        >>> normalize_label("grizzly+bear")
        'grizzly bear'
        >>> normalize_label("  German_Shepherd ")
        'german shepherd'
    """
    return _SEPARATORS.sub(" ", s.casefold()).strip()


@dataclass(frozen=True)
class ClassPrompt:
    """One class of a prompts file.

    Attributes:
        name: The class name as written (what predictions print).
        description: Text after ``:``, or None.
        synonyms: Other names after ``|``, in file order.
        line: 1-based line number in the source (item number for a list).
        ancestors: Coarser labels after ``>``, nearest first (parent, grandparent, ...,
            root); not classes (see :mod:`hybridcls.hierarchy`).
    """

    name: str
    description: str | None = None
    synonyms: tuple[str, ...] = ()
    line: int = 0
    ancestors: tuple[str, ...] = ()


@dataclass(frozen=True)
class PromptSet:
    """The ordered classes of a prompts source.

    Attributes:
        classes: One :class:`ClassPrompt` per class, in source order.
        source: The file the classes came from (``"<string>"`` or :data:`PROMPTS_LIST`
            otherwise);
            used in error messages.
    """

    classes: tuple[ClassPrompt, ...]
    source: str = "<string>"

    @property
    def names(self) -> list[str]:
        """Class names in order."""
        return [c.name for c in self.classes]

    @property
    def has_ancestors(self) -> bool:
        """Whether any class names ancestors (``> ANCESTOR``): what roll-up needs."""
        return any(c.ancestors for c in self.classes)

    def __len__(self) -> int:
        return len(self.classes)

    def __iter__(self) -> Iterator[ClassPrompt]:
        return iter(self.classes)

    def to_text(self) -> str:
        """The prompts file that parses back to these classes (:func:`format_prompt_line` per class).

        Example:
            >>> ps = parse_prompts("moose: a large deer | elk\\nbat")
            >>> parse_prompts(ps.to_text()).classes == tuple(
            ...     ClassPrompt(c.name, c.description, c.synonyms, i) for i, c in enumerate(ps, 1))
            True
            >>> parse_prompts("red fox | fox > canid > mammal").to_text()
            'red fox | fox > canid > mammal\\n'
        """
        return "".join(format_prompt_line(c) + "\n" for c in self.classes)

    def __getitem__(self, i: int) -> ClassPrompt:
        return self.classes[i]

    def index(self, name: str) -> int:
        """Position of the class whose name normalises like ``name`` (synonyms not used).

        Raises:
            KeyError: No class has that name.
        """
        key = normalize_label(name)
        for i, c in enumerate(self.classes):
            if normalize_label(c.name) == key:
                return i
        raise KeyError(f"{self.source}: no class named {name!r}")

    def match(self, name: str) -> int | None:
        """Position of the line ``name`` refers to, by name or synonym; None if none.

        A class name wins over nothing else, because parsing already refuses a
        synonym equal to another class's name; two synonyms on different lines
        can still both match, and that is an error.

        Raises:
            PromptFileError: ``name`` matches more than one line (names both).

        Example:
            >>> ps = parse_prompts("moose: a large deer | elk\\ngrizzly bear")
            >>> ps.match("Grizzly+Bear"), ps.match("ELK"), ps.match("wolf")
            (1, 0, None)
        """
        key = normalize_label(name)
        hits = [
            i
            for i, c in enumerate(self.classes)
            if key in {normalize_label(x) for x in (c.name, *c.synonyms)}
        ]
        if not hits:
            return None
        if len(hits) > 1:
            a, b = self.classes[hits[0]], self.classes[hits[1]]
            raise PromptFileError(
                self.source,
                b.line,
                f"class {name!r} matches both this line ({b.name!r}) and line {a.line} "
                f"({a.name!r}); make the synonyms distinct",
            )
        return hits[0]


def format_prompt_line(prompt: ClassPrompt) -> str:
    """One class as a prompts-file line, ``NAME[: DESCRIPTION][ | SYNONYM ...][ > ANCESTOR ...]``:
    what the parser reads.

    Example:
        >>> format_prompt_line(ClassPrompt("moose", "a large deer", ("elk",)))
        'moose: a large deer | elk'
        >>> format_prompt_line(ClassPrompt("moose", ancestors=("deer", "mammal")))
        'moose > deer > mammal'
    """
    line = prompt.name
    if prompt.description:
        line += f": {prompt.description}"
    if prompt.synonyms:
        line += " | " + " | ".join(prompt.synonyms)
    if prompt.ancestors:
        line += " > " + " > ".join(prompt.ancestors)
    return line


def align_classes(seen: Sequence[str], prompts: PromptSet) -> PromptSet:
    """Reorder a prompt set: the seen classes first (in ``seen`` order), then the rest.

    A training folder name matches its prompts line after normalisation
    (case, ``_``, ``+``, ``-``, repeated spaces) or through a synonym.

    Raises:
        PromptFileError: A seen class matches no line, or two seen classes
            match the same line (names both sides).

    Example:
        >>> ps = parse_prompts("fox\\ngrizzly bear\\nmoose | elk", source="p.txt")
        >>> align_classes(["Grizzly+Bear", "elk"], ps).names
        ['grizzly bear', 'moose', 'fox']
    """
    taken: dict[int, str] = {}
    order: list[int] = []
    missing: list[str] = []
    for name in seen:
        i = prompts.match(name)
        if i is None:
            missing.append(name)
            continue
        if i in taken:
            raise PromptFileError(
                prompts.source, prompts[i].line,
                f"training classes {taken[i]!r} and {name!r} both match the line {prompts[i].name!r}",
            )
        taken[i] = name
        order.append(i)
    if missing:
        shown = ", ".join(repr(m) for m in missing[:8]) + (" ..." if len(missing) > 8 else "")
        what = "name in the list" if prompts.source == PROMPTS_LIST else "line of the prompts file"
        raise PromptFileError(
            prompts.source, None,
            f"{len(missing)} training class(es) match no {what}: {shown}; add them"
            + ("" if prompts.source == PROMPTS_LIST else
               " (or a synonym after '|') to the prompts file"),
        )
    rest = [i for i in range(len(prompts)) if i not in taken]
    return PromptSet(tuple(prompts[i] for i in order + rest), prompts.source)


def labelled_phrases(prompt: ClassPrompt) -> list[tuple[str, str]]:
    """:func:`class_phrases` with what each phrase is, for messages.

    Example:
        >>> labelled_phrases(ClassPrompt("moose", "a large deer", ("elk",)))
        [('name', 'moose'), ("synonym 'elk'", 'elk'), ('description', 'moose, a large deer')]
    """
    phrases = [("name", prompt.name), *((f"synonym {s!r}", s) for s in prompt.synonyms)]
    if prompt.description:
        phrases.append(("description", f"{prompt.name}, {prompt.description}"))
    return phrases


def class_phrases(prompt: ClassPrompt) -> list[str]:
    """The phrases whose embeddings are averaged into one class column.

    The name, each synonym, and (with a description) ``"NAME, DESCRIPTION"``:
    the description is attached to the name rather than embedded alone, so a
    template reads ``"a photo of a moose, a large deer with broad flat antlers."``
    and a vague description ("a small rodent") still points at its class.
    Every phrase weighs the same.

    Example:
        >>> class_phrases(ClassPrompt("moose", "a large deer", ("elk",)))
        ['moose', 'elk', 'moose, a large deer']
    """
    return [text for _, text in labelled_phrases(prompt)]


@dataclass(frozen=True)
class TemplateSet:
    """The ordered templates of a templates source, with the line of each.

    Attributes:
        templates: ``str.format`` templates with one ``{}``, in source order.
        lines: 1-based line of each template in :attr:`source` (item number for a list).
        source: The file the templates came from (:data:`TEMPLATES_LIST` for a Python list,
            ``"<bundled templates.txt>"`` for the default); used in error messages.
    """

    templates: tuple[str, ...]
    lines: tuple[int, ...]
    source: str = TEMPLATES_LIST

    def __len__(self) -> int:
        return len(self.templates)

    def __iter__(self) -> Iterator[str]:
        return iter(self.templates)

    def __getitem__(self, i: int) -> str:
        return self.templates[i]


def _strip_comment(line: str) -> str:
    return _COMMENT.sub("", line).strip()


def _parse_class_line(text: str, source: str, lineno: int) -> ClassPrompt:
    # The first '>' ends the class's own text: what follows is its ancestors, so no name,
    # description or synonym can hold a '>'.
    text, gt, chain = text.partition(">")
    head, *syn_parts = text.split("|")
    name, colon, description = head.partition(":")
    name = " ".join(name.split())
    if not normalize_label(name):  # "" or only separators such as "+_-"
        raise PromptFileError(source, lineno, "empty class name")
    desc: str | None = None
    if colon:
        desc = " ".join(description.split())
        if not desc:
            raise PromptFileError(source, lineno, f"empty description after ':' for {name!r}")
    synonyms: list[str] = []
    for part in syn_parts:
        syn = " ".join(part.split())
        if not syn:
            raise PromptFileError(source, lineno, f"empty synonym after '|' for {name!r}")
        if not normalize_label(syn):  # like a name, a synonym needs more than "+_-"
            raise PromptFileError(source, lineno, f"synonym {syn!r} of {name!r} is only separators")
        if normalize_label(syn) in {normalize_label(x) for x in (name, *synonyms)}:
            raise PromptFileError(source, lineno, f"synonym {syn!r} repeats a name on this line")
        synonyms.append(syn)
    ancestors = _parse_ancestors(chain, name, synonyms, source, lineno) if gt else ()
    return ClassPrompt(name=name, description=desc, synonyms=tuple(synonyms), line=lineno,
                       ancestors=ancestors)


def _parse_ancestors(chain: str, name: str, synonyms: Sequence[str], source: str, lineno: int
                     ) -> tuple[str, ...]:
    """The ``> A > B`` part of a class line (without its first ``>``): the ancestors, nearest first."""
    own = {normalize_label(x) for x in (name, *synonyms)}
    ancestors: list[str] = []
    for part in chain.split(">"):
        anc = " ".join(part.split())
        if not normalize_label(anc):  # "" or only separators, as for a name
            raise PromptFileError(source, lineno, f"empty ancestor after '>' for {name!r}")
        syntax = next((c for c in ":|" if c in anc), None)
        if syntax is not None:
            # a description or synonym written after the chain would silently become a name
            raise PromptFileError(source, lineno, f"ancestor {anc!r} of {name!r} holds {syntax!r}: "
                                  "ancestors are names only; put the description and synonyms "
                                  "before the first '>'")
        key = normalize_label(anc)
        if key in own:
            raise PromptFileError(source, lineno,
                                  f"ancestor {anc!r} of {name!r} is a name of the class itself")
        if key in {normalize_label(a) for a in ancestors}:
            raise PromptFileError(source, lineno, f"ancestor {anc!r} appears twice in the chain of "
                                  f"{name!r} (a cycle); list each ancestor once, nearest first")
        ancestors.append(anc)
    return tuple(ancestors)


def _collect(
    lines: Iterable[tuple[int, str]],
    source: str,
    parse: Callable[[str, int], T],
    label: Callable[[T], str],
    same: Callable[[str], str],
    what: tuple[str, str],
) -> list[tuple[int, T]]:
    """Parse non-comment lines into ``(line, item)``; refuse two items whose ``same(label(item))`` are equal.

    ``what`` is the item word, singular and plural, for messages.
    """
    items: list[tuple[int, T]] = []
    first_line: dict[str, int] = {}
    for lineno, raw in lines:
        text = _strip_comment(raw)
        if not text:
            continue
        item = parse(text, lineno)
        name = label(item)
        key = same(name)
        if key in first_line:
            raise PromptFileError(
                source, lineno, f"duplicate {what[0]} {name!r} (already on line {first_line[key]})"
            )
        first_line[key] = lineno
        items.append((lineno, item))
    if not items:
        raise PromptFileError(source, None, f"no {what[1]} found (only blank lines or comments)")
    return items


def _build_set(lines: Iterable[tuple[int, str]], source: str) -> PromptSet:
    classes = [
        cp
        for _, cp in _collect(
            lines,
            source,
            lambda text, lineno: _parse_class_line(text, source, lineno),
            lambda cp: cp.name,
            normalize_label,
            ("class", "classes"),
        )
    ]
    by_name = {normalize_label(cp.name): cp for cp in classes}
    # Synonyms are checked after all names are known so the order of lines does not matter.
    for cp in classes:
        for syn in cp.synonyms:
            other = by_name.get(normalize_label(syn))
            if other is not None and other is not cp:
                raise PromptFileError(
                    source,
                    cp.line,
                    f"synonym {syn!r} of {cp.name!r} is the name of the class on line {other.line}",
                )
    _check_tree(classes, source)
    return PromptSet(classes=tuple(classes), source=source)


def _check_tree(classes: Sequence[ClassPrompt], source: str) -> None:
    """Refuse ancestors that do not make one tree: an ancestor that is a class (name or synonym),
    or one ancestor given two different parents (a line's chain ends at its root, so a chain
    that stops early gives its last ancestor no parent)."""
    names = {normalize_label(x): cp for cp in classes for x in (cp.name, *cp.synonyms)}
    parent: dict[str, tuple[str | None, int]] = {}  # ancestor -> (its parent, the line that said so)
    for cp in classes:
        for i, anc in enumerate(cp.ancestors):
            key = normalize_label(anc)
            other = names.get(key)
            if other is not None:
                raise PromptFileError(
                    source, cp.line, f"ancestor {anc!r} of {cp.name!r} is a name of the class on "
                    f"line {other.line}; ancestors are coarser labels, not classes")
            up = cp.ancestors[i + 1] if i + 1 < len(cp.ancestors) else None
            known = parent.setdefault(key, (up, cp.line))
            if (known[0] and normalize_label(known[0])) != (up and normalize_label(up)):
                def says(p: str | None) -> str:
                    return f"parent {p!r}" if p else "no parent (ends the chain)"
                raise PromptFileError(
                    source, cp.line, f"ancestor {anc!r} has {says(up)} here but {says(known[0])} "
                    f"on line {known[1]}; give every class its whole chain, the same above each "
                    "ancestor")


def parse_prompts(text: str, source: str = "<string>") -> PromptSet:
    """Parse the text of a prompts file.

    Args:
        text: The file content.
        source: Name used in error messages.

    Returns:
        The classes in order.

    Raises:
        PromptFileError: Empty name/description/synonym/ancestor, duplicate class (after
            normalisation; names the earlier line), a synonym equal to another
            class's name, an ancestor that is a class's name or synonym, appears twice in
            one chain or has two different parents, or no classes at all.

    Example:
        >>> ps = parse_prompts("# animals\\nmoose: a large deer with broad flat antlers | elk\\nbat")
        >>> ps.names
        ['moose', 'bat']
        >>> ps[0].description, ps[0].synonyms
        ('a large deer with broad flat antlers', ('elk',))
    """
    return _build_set(enumerate(text.splitlines(), start=1), source)


def _read_text(path: str | os.PathLike[str], parameter: str | None = None) -> str:
    """A UTF-8 text file's text; a file that cannot be read is named by the ``parameter`` that
    gave it, when one did (:class:`~hybridcls.errors.PromptFileError`)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise PromptFileError(str(p), None, f"cannot read file: {exc.strerror or exc}",
                              parameter=parameter) from exc
    try:
        # utf-8-sig: files saved by Windows editors start with a BOM that is not part of line 1.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise PromptFileError(
            str(p), line, f"not valid UTF-8 (byte 0x{data[exc.start]:02x}); save the file as UTF-8"
        ) from exc


def read_prompts(path: str | os.PathLike[str], *, parameter: str | None = None) -> PromptSet:
    """Read and parse a prompts file (UTF-8).

    ``parameter``: the one that gave the file (``"prompts"``), named when it cannot be read.

    Example:
        >>> read_prompts("prompts/animals.txt").names[:3]  # doctest: +SKIP
        ['antelope', 'grizzly bear', 'killer whale']
    """
    return parse_prompts(_read_text(path, parameter), source=str(path))


def as_prompt_set(prompts: PromptSet | str | os.PathLike[str] | Sequence[str]) -> PromptSet:
    """Accept any prompts source: a :class:`PromptSet`, a file path, or a list of lines.

    Items of a list are parsed like the lines of a file (so ``"moose | elk"``
    works); errors name the item number as the line, with source :data:`PROMPTS_LIST`. A
    file that cannot be read is named as the ``prompts`` parameter.
    """
    if isinstance(prompts, PromptSet):
        return prompts
    if isinstance(prompts, (str, os.PathLike)):
        return read_prompts(prompts, parameter="prompts")
    items = list(prompts)
    for i, item in enumerate(items, start=1):
        if not isinstance(item, str) or "\n" in item:
            raise PromptFileError(PROMPTS_LIST, i, f"expected one class per item, got {item!r}")
    return _build_set(enumerate(items, start=1), PROMPTS_LIST)


def _template_problem(template: str) -> str | None:
    try:
        a, b = template.format("\x00a"), template.format("\x00b")
    except (IndexError, KeyError, ValueError):
        return (
            "template must contain exactly one '{}' and no other braces "
            "(write '{{' or '}}' for a literal brace)"
        )
    if a == b:
        return "template has no '{}' placeholder for the class name"
    return None


def _parse_template(text: str, source: str, lineno: int) -> str:
    problem = _template_problem(text)
    if problem:
        raise PromptFileError(source, lineno, f"{problem}: {text!r}")
    return text


def _build_templates(lines: Iterable[tuple[int, str]], source: str) -> TemplateSet:
    parsed = _collect(
        lines,
        source,
        lambda text, lineno: _parse_template(text, source, lineno),
        str,
        str,
        ("template", "templates"),
    )
    return TemplateSet(
        templates=tuple(t for _, t in parsed), lines=tuple(n for n, _ in parsed), source=source
    )


def parse_templates(text: str, source: str = "<string>") -> list[str]:
    """Parse the text of a templates file: one ``str.format`` template per line.

    Raises:
        PromptFileError: A template without ``{}`` or with other braces, a
            duplicate template, or no templates.

    Example:
        >>> parse_templates("a photo of a {}.\\n# comment\\na drawing of the {}.")
        ['a photo of a {}.', 'a drawing of the {}.']
    """
    return list(_build_templates(enumerate(text.splitlines(), start=1), source))


def _check_template_list(templates: Sequence[str], source: str) -> TemplateSet:
    for i, t in enumerate(templates, start=1):
        if not isinstance(t, str) or "\n" in t:
            raise PromptFileError(source, i, f"expected one template string per item, got {t!r}")
    return _build_templates(enumerate(templates, start=1), source)


def check_templates(templates: Sequence[str], source: str = TEMPLATES_LIST) -> list[str]:
    """Validate templates given as a Python list (same rules as a file; item number as line)."""
    return list(_check_template_list(templates, source))


def _read_template_set(path: str | os.PathLike[str] | None, parameter: str | None = None
                       ) -> TemplateSet:
    if path is None:
        ref = resources.files("hybridcls.zeroshot").joinpath(DEFAULT_TEMPLATES_NAME)
        text, source = ref.read_text(encoding="utf-8"), f"<bundled {DEFAULT_TEMPLATES_NAME}>"
    else:
        text, source = _read_text(path, parameter), str(path)
    return _build_templates(enumerate(text.splitlines(), start=1), source)


def read_templates(path: str | os.PathLike[str] | None = None) -> list[str]:
    """Read a templates file; ``None`` reads the bundled default.

    The bundled default is open_clip's 80 ``OPENAI_IMAGENET_TEMPLATES``
    written out with ``{}`` placeholders.

    Example:
        >>> len(read_templates())
        80
    """
    return list(_read_template_set(path))


def as_template_set(
    templates: TemplateSet | str | os.PathLike[str] | Sequence[str] | None = None,
    *, source: str = TEMPLATES_LIST,
) -> TemplateSet:
    """Accept any templates source: a :class:`TemplateSet`, a file, a list, or None (the default).

    Keeps each template's line, so that messages about a template (one too
    long for the model, say) name ``FILE:LINE``; items of a list are numbered
    from 1, with ``source`` (:data:`TEMPLATES_LIST`; the templates a gate recorded name
    their file). A file that cannot be read is named as the ``templates`` parameter.

    Example:
        >>> ts = as_template_set(["a photo of a {}.", "itap of my {}."])
        >>> ts.source, ts.lines, len(as_template_set())
        ('<templates list>', (1, 2), 80)
    """
    if isinstance(templates, TemplateSet):
        return templates
    if templates is None or isinstance(templates, (str, os.PathLike)):
        return _read_template_set(templates, "templates")
    return _check_template_list(list(templates), source)
