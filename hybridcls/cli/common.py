"""What every subcommand shares: the runtime and CLIP flags, classifiers from flags, usage errors,
and the one place a Python parameter's name becomes the flag that sets it.

The runtime flags are declared from :class:`~hybridcls.runtime.RuntimeSettings`
(their defaults and choices are read there) and map back onto it with
:func:`runtime_from_args`; the CLIP flags' defaults are the zero-shot
branch's own. Library errors name Python parameters (``batch_size=0: ...``);
:func:`flag_message` rewrites those names into this command's flags
(``--batch-size 0: ...``) before the command line prints them (errors, warnings,
and the library sentences a command prints, such as calibration's adapted settings).
"""

from __future__ import annotations

import argparse
import ast
import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hybridcls.cache import file_fingerprint
from hybridcls.errors import HybridclsError
from hybridcls.runtime import DECODERS, PRECISIONS, RuntimeSettings
from hybridcls.zeroshot.defaults import (
    DEFAULT_CLIP_MODEL,
    DEFAULT_CLIP_PRETRAINED,
    LOCAL_DIR_PREFIX,
)
from hybridcls.zeroshot.prompts import PROMPTS_LIST

__all__ = [
    "CHECKPOINT_FORMS",
    "UsageError",
    "add_checkpoint_argument",
    "add_class_arguments",
    "add_clip_arguments",
    "add_clip_model_arguments",
    "add_log_argument",
    "add_runtime_arguments",
    "class_list",
    "clip_from_args",
    "clip_settings",
    "flag_message",
    "hybrid_from_args",
    "hybrid_parameters",
    "path_fingerprint",
    "prompts_from_args",
    "runtime_from_args",
    "zeroshot_from_args",
]

_R = RuntimeSettings


class UsageError(HybridclsError):
    """A problem with the command line or its input files; exit status 2."""


#: What ``--checkpoint`` can take, as every command's usage line names it: a run directory, a
#: ``save_pretrained`` folder, a Hugging Face Hub repo id (each command says which it takes).
CHECKPOINT_FORMS = {"run": "RUN_DIR", "saved": "SAVED_DIR", "hub": "ORG/NAME"}


def add_checkpoint_argument(g: argparse._ActionsContainer, *takes: str, help: str,
                            required: bool = False) -> None:
    """``--checkpoint``, its metavar naming every form it takes (:data:`CHECKPOINT_FORMS`).

    Args:
        g: The parser or argument group.
        *takes: The forms, in order: ``"run"``, ``"saved"``, ``"hub"``.
        help: The flag's help, which says what each form is.
        required: Whether the command needs it.

    Example:
        >>> p = argparse.ArgumentParser(prog="x")
        >>> add_checkpoint_argument(p, "run", "saved", help="h")
        >>> p.format_usage()
        'usage: x [-h] [--checkpoint RUN_DIR|SAVED_DIR]\\n'
    """
    g.add_argument("--checkpoint", required=required, default=None, help=help,
                   metavar="|".join(CHECKPOINT_FORMS[form] for form in takes))


def add_clip_model_arguments(g: argparse._ActionsContainer) -> None:
    """``--clip-model``, ``--clip-pretrained``, ``--cache-dir``: for any command that loads CLIP."""
    # None = not given: a calibrated --checkpoint's own CLIP, else the default (clip_from_args)
    g.add_argument("--clip-model", default=None, metavar="ID",
                   help=f"open_clip model: a built-in name, hf-hub:ORG/REPO or local-dir:DIR "
                        f"(default: the one a calibrated --checkpoint's gate records, else "
                        f"{DEFAULT_CLIP_MODEL})")
    g.add_argument("--clip-pretrained", default=None, metavar="TAG|FILE",
                   help=f"pretrained tag or local weights file for a built-in name "
                        f"(default: as --clip-model, else {DEFAULT_CLIP_PRETRAINED}; '' for random "
                        f"weights; refused with hf-hub: and local-dir:, whose weights come with "
                        f"the model)")
    g.add_argument("--cache-dir", default=_R.cache_dir, metavar="DIR",
                   help="cache for downloaded weights and text classifiers "
                        "(default: $HYBRIDCLS_CACHE_DIR or ~/.cache/hybridcls)")


# Characters a --classes name may not hold: a prompts file's syntax (description, synonym, comment,
# ancestors).
_PROMPT_SYNTAX = (":", "|", "#", ">")


def class_list(text: str) -> list[str]:
    """``--classes "fox,moose,elk"``: class names separated by commas, as a list.

    Used as the flag's ``type``, so that argparse reports a problem as
    ``argument --classes: ...`` (exit status 2). Spaces around a name are
    dropped; names are compared as the prompts file compares them
    (:func:`~hybridcls.zeroshot.prompts.normalize_label`: case, ``_``, ``+``, ``-``).

    Raises:
        argparse.ArgumentTypeError: An empty name (``"fox,,elk"``, a trailing comma),
            two names of one class, or a description, synonym or comment, which only a
            prompts file can hold.

    Example:
        >>> class_list(" fox, polar bear ,elk")
        ['fox', 'polar bear', 'elk']
        >>> class_list("fox,,elk")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: name 2 of 3 in 'fox,,elk' is empty
    """
    from hybridcls.zeroshot.prompts import normalize_label  # torch-free

    names = [" ".join(part.split()) for part in text.split(",")]
    first: dict[str, int] = {}
    for i, name in enumerate(names, start=1):
        if not normalize_label(name):
            raise argparse.ArgumentTypeError(f"name {i} of {len(names)} in {text!r} is empty")
        syntax = [c for c in _PROMPT_SYNTAX if c in name]
        if syntax:
            raise argparse.ArgumentTypeError(
                f"name {i} ({name!r}) holds {syntax[0]!r}: --classes takes names only; write a "
                "prompts file (--prompts FILE) for descriptions, synonyms, comments or ancestors")
        key = normalize_label(name)
        if key in first:
            j = first[key]
            raise argparse.ArgumentTypeError(
                f"names {j} and {i} ({names[j - 1]!r} and {name!r}) are the same class")
        first[key] = i
    return names


def add_class_arguments(g: argparse._ActionsContainer, *, required: bool,
                        prompts_help: str) -> None:
    """``--prompts FILE`` or ``--classes "a,b,c"`` (one of them; both is an error)."""
    one = g.add_mutually_exclusive_group(required=required)
    one.add_argument("--prompts", metavar="FILE", help=prompts_help)
    one.add_argument("--classes", type=class_list, metavar="NAMES",
                     help='the classes inline instead of --prompts, comma-separated: '
                          '--classes "fox,moose,polar bear" (names only)')


def prompts_from_args(args: argparse.Namespace) -> str | list[str] | None:
    """The library's ``prompts``: the ``--prompts`` file, else the ``--classes`` names, else None."""
    return args.prompts or getattr(args, "classes", None)


def path_fingerprint(path: str | None, cache_dir: str | None = None) -> Any:
    """What identifies a file or folder a setting names, for manifests that must match on resume.

    A file: its content hash; a folder: the hash of each file below it, by its
    path relative to the folder (a support folder holds its images in class
    subfolders); anything else (a model name, a tag): the text itself; None:
    None. ``cache_dir`` keeps large files' hashes
    (:func:`hybridcls.cache.file_fingerprint`).
    """
    if not path:
        return None
    p = Path(path)
    if p.is_dir():
        return {f.relative_to(p).as_posix(): file_fingerprint(f, cache_dir=cache_dir)
                for f in sorted(p.rglob("*")) if f.is_file()}
    return file_fingerprint(p, cache_dir=cache_dir) if p.is_file() else path


def add_clip_arguments(parser: argparse.ArgumentParser, *, prompts_required: bool = True) -> None:
    """The zero-shot branch's flags: prompts (or ``--classes``), templates, the model,
    ``--truncate-prompts``."""
    g = parser.add_argument_group("zero-shot branch (open_clip)")
    add_class_arguments(g, required=prompts_required,
                        prompts_help="class prompts file: one class per line, "
                                     "'name: description | synonym'")
    g.add_argument("--templates", metavar="FILE",
                   help="prompt templates with a {} placeholder (default: those the --checkpoint's gate was "
                        "calibrated with, else OpenAI ImageNet templates)")
    g.add_argument("--truncate-prompts", action="store_true",
                   help="accept class texts longer than the model's context, cut by its tokenizer "
                        "(default: refuse them, naming the prompts file line; docs/prompts.md)")
    add_clip_model_arguments(g)


def add_log_argument(parser: argparse.ArgumentParser) -> None:
    """``--log FILE``: every command's (:func:`hybridcls.cli.main` writes it)."""
    parser.add_argument("--log", metavar="FILE", default=None,
                        help="write the run record to FILE as JSON: versions, models and their "
                             "fingerprints, gate, command line, device, start and end times, "
                             "counts, exit status (docs/provenance.md)")


def add_runtime_arguments(parser: argparse.ArgumentParser, *, engine_options: bool = True) -> None:
    """The :class:`~hybridcls.runtime.RuntimeSettings` flags (``--cache-dir`` comes with the CLIP flags).

    Args:
        parser: The subcommand's parser.
        engine_options: Also ``--precision``, ``--compile``, ``--gpu-decode`` and ``--full-decode``
            (commands whose models run through the inference engine).
    """
    g = parser.add_argument_group("runtime")
    g.add_argument("--device", default=_R.device, metavar="DEVICE",
                   help="any torch device: cpu, cuda, cuda:1, mps, or auto (CUDA when available) "
                        "(default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=_R.batch_size, metavar="N",
                   help="images per batch (default: %(default)s)")
    g.add_argument("--workers", type=int, default=_R.workers, metavar="N",
                   help="image-decoding worker processes, 0 to decode in the main process "
                        "(default: %(default)s)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    if engine_options:
        g.add_argument("--precision", choices=PRECISIONS, default=_R.precision,
                       help="numeric precision of the towers: auto (bfloat16 on CUDA; on a CPU with "
                            "native bfloat16, the CNN in bfloat16 and CLIP in float32; else float32), "
                            "fp32, bf16, fp16, or int8 (CPU only: Linear layers quantised) "
                            "(default: %(default)s)")
        g.add_argument("--compile", action="store_true",
                       help="torch.compile both towers (fixed batch shapes; compiling takes minutes "
                            "and pays off on long runs only: docs/benchmarks.md)")
        g.add_argument("--gpu-decode", action="store_true",
                       help="decode JPEG files on the GPU (CUDA only; other files use the CPU decoder)")
        g.add_argument("--full-decode", action="store_true",
                       help="decode every JPEG file at full size (default: a JPEG much larger than "
                            "the models' input is decoded at 1/2 to 1/8 scale, still at least twice "
                            "the size the models resize it to)")


def runtime_from_args(args: argparse.Namespace) -> RuntimeSettings:
    """The :class:`~hybridcls.runtime.RuntimeSettings` the runtime flags describe.

    Raises:
        ParameterError: A value out of range (shown by the command line with its flag).
        UsageError: ``--gpu-decode`` without a CUDA device (the library's ``decode="device"``
            also runs on the CPU, with torchvision's decoder; the flag promises the GPU).
    """
    if getattr(args, "gpu_decode", False):
        from hybridcls.device import resolve_device  # torch: only for the flag that needs it

        if resolve_device(args.device).type != "cuda":
            raise UsageError(f"--gpu-decode needs a CUDA device; --device {args.device} is not one")
    return RuntimeSettings(
        device=args.device, batch_size=args.batch_size, workers=args.workers,
        precision=getattr(args, "precision", _R.precision),
        compile=getattr(args, "compile", _R.compile),
        decode=DECODERS[1] if getattr(args, "gpu_decode", False) else DECODERS[0],
        draft=not getattr(args, "full_decode", False),
        cache_dir=getattr(args, "cache_dir", _R.cache_dir),
        progress=not args.quiet,
    )


def clip_from_args(args: argparse.Namespace) -> tuple[str, str | None]:
    """``--clip-model`` and ``--clip-pretrained`` as the library's ``clip_model`` and
    ``clip_pretrained``: what :func:`hybridcls.zeroshot.gate_clip.clip_to_load` makes of them.

    Without ``--clip-model``, the CLIP the ``--checkpoint``'s gate was calibrated with (its
    ``gate.json`` records it), else the default model; without ``--clip-pretrained``, that
    CLIP's weights (the default tag for a built-in name, none for ``hf-hub:`` /
    ``local-dir:``); ``''`` = random weights.
    """
    from hybridcls.zeroshot.gate_clip import clip_to_load, recorded_clip

    checkpoint = getattr(args, "checkpoint", None)
    record = recorded_clip(checkpoint) if args.clip_model is None and checkpoint else None
    return clip_to_load(args.clip_model, _clip_pretrained_flag(args), record)


def _clip_pretrained_flag(args: argparse.Namespace) -> str | None:
    """``--clip-pretrained`` as the library's ``clip_pretrained``: not given is its default tag
    (which :func:`~hybridcls.zeroshot.gate_clip.clip_to_load` reads as "the recorded weights")."""
    return DEFAULT_CLIP_PRETRAINED if args.clip_pretrained is None else args.clip_pretrained


def clip_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The CLIP model and weights the flags name (:func:`clip_from_args`), as a resumed or merged
    file's manifest compares them: files and ``local-dir:`` folders by content
    (:func:`path_fingerprint`), names as text."""
    clip, pretrained = clip_from_args(args)
    return {
        "clip_model": (path_fingerprint(clip.removeprefix(LOCAL_DIR_PREFIX), args.cache_dir)
                       if clip.startswith(LOCAL_DIR_PREFIX) else clip),
        "clip_pretrained": path_fingerprint(pretrained, args.cache_dir),
    }


def zeroshot_from_args(args: argparse.Namespace) -> Any:
    """A fitted :class:`~hybridcls.ZeroShotClassifier` from the CLIP, runtime and gate flags."""
    # the classifiers (torch, open_clip) are imported when a command builds one
    from hybridcls.zeroshot.classifier import ZeroShotClassifier

    clip_model, clip_pretrained = clip_from_args(args)
    return ZeroShotClassifier(
        clip_model=clip_model, clip_pretrained=clip_pretrained,
        prompts=prompts_from_args(args), templates=args.templates,
        unknown_threshold=getattr(args, "unknown_threshold", None),
        truncate_prompts=getattr(args, "truncate_prompts", False),
        support=getattr(args, "support", None),
        **runtime_from_args(args).to_dict(),
    ).fit()


def hybrid_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`~hybridcls.HybridClassifier` parameters the flags set beside its CLIP and
    templates: the decision flags the command has (``--mode``, ``--unknown-threshold``,
    ``--cascade``, ``--support``), ``--truncate-prompts`` and the runtime."""
    return {
        "mode": getattr(args, "mode", None),
        "unknown_threshold": getattr(args, "unknown_threshold", None),
        "cascade": getattr(args, "cascade", False),
        "truncate_prompts": getattr(args, "truncate_prompts", False),
        "support": getattr(args, "support", None),
        **runtime_from_args(args).to_dict(),
    }


def hybrid_from_args(args: argparse.Namespace, *, recalibrate: bool = False, **params: Any) -> Any:
    """A :class:`~hybridcls.HybridClassifier` loaded from ``--checkpoint`` and the flags.

    Args:
        args: The parsed flags (CLIP, runtime and, where the command has them, gate flags).
        recalibrate: The command calibrates the run: a CLIP other than its gate's is the one
            to calibrate on. Otherwise such a CLIP is refused here, before anything is written.
        **params: Further estimator parameters (calibration's ``method``, ``tpr``...).

    Raises:
        ParameterError: ``--clip-model`` / ``--clip-pretrained`` naming another CLIP than the
            one the run's gate was calibrated with (not with ``recalibrate``).
        CheckpointError: A run without a gate (not with ``recalibrate``), said before any
            model loads.
    """
    from hybridcls.hybrid import HybridClassifier, check_calibrated

    if not recalibrate:
        check_calibrated(args.checkpoint)

    # the flags as given: the classifier itself loads the CLIP its gate recorded when none is
    # chosen (clip_from_args's rule), and can then say that the recorded one is what fails
    clf = HybridClassifier(
        clip_model=args.clip_model,
        clip_pretrained=_clip_pretrained_flag(args),
        templates=args.templates, **hybrid_parameters(args), **params,
    ).load_run(args.checkpoint, prompts_from_args(args))
    if getattr(clf, "gate_error_", None) is not None and not recalibrate:
        raise clf.gate_error_
    return clf


# A parameter whose flag is not its name with dashes, or whose flag is a switch for one value.
_SWITCHES: dict[tuple[str, str], str] = {
    ("decode", repr(DECODERS[1])): "--gpu-decode",
    ("decode", repr(DECODERS[0])): "no --gpu-decode",
    ("draft", "False"): "--full-decode",
    ("draft", "True"): "no --full-decode",
    ("progress", "False"): "-q",
    ("progress", "True"): "no -q",
    ("pretrained", "False"): "--no-pretrained",  # train (not True: timm.create_model(pretrained=True))
    # predict's switch, also where merge says how to finish a part (train's resume is a folder)
    ("resume", "True"): "--resume",
}
# A library parameter whose flag's destination has another name (the flag exists only in some commands).
_DESTINATIONS = {
    "k": "folds",  # train_folds(k=)
    "trainable_stages": "freeze",  # freeze_backbone(), SupervisedModel.freeze()
    "tag": "pretrained_tag",  # resolve_model_name(), create_backbone()
    "val_dir": "val",  # audit_dataset(); train's --val is val_dir already
    "test_dir": "test",  # audit_dataset()
    "data_dir": "data",  # calibrate(data_dir=); train's DATA_DIR is positional, not a flag
    "run_dir": "checkpoint",  # load_run(run_dir=)
}
# A parameter stands on its own: "runs/seed=0" or "data-batch_size=3" is a path, not one.
_PARAMETER = re.compile(r"(?<![/\\.\-=])\b([a-z][a-z0-9_]*)=('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|[^\s,;:)]+)")


# The methods library messages tell the user to call, which have a command of their own.
_COMMAND_CALLS = ("calibrate", "train")
# One argument of such a call: a parameter and a literal value (a repr, or a bare placeholder).
_ARGUMENT = r"[a-z][a-z0-9_]*=(?:'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|[^\s,'\"()]+)"
# A call standing on its own (after a space, a backquote or a parenthesis, not inside a path like
# "data/train(old)"), its arguments literal: calibrate(), HybridClassifier.calibrate(data_dir='D').
_CALL = re.compile(rf"(?:(?<=[\s`(])|^)(?:HybridClassifier\.)?(?P<name>{'|'.join(_COMMAND_CALLS)})"
                   rf"\((?P<args>(?:\s*{_ARGUMENT}\s*,?)*)\)")


# A call that loads a run with other settings, which predict and explain do with their own flags:
# load_run(run_dir=RUN_DIR, prompts=FILE) is ``--checkpoint RUN_DIR --prompts FILE``.
_LOAD_CALL = re.compile(rf"(?:(?<=[\s`(])|^)(?:HybridClassifier\.)?load_run"
                        rf"\((?P<args>(?:\s*{_ARGUMENT}\s*,?)*)\)")
# Where the library names a class list given in Python (a prompts list, item N as the line).
_PROMPTS_LIST = re.compile(re.escape(PROMPTS_LIST) + r"(?::(\d+))?")


def _flags_of(parser: argparse.ArgumentParser) -> dict[str, tuple[str, bool]]:
    """Each parameter a flag of ``parser`` sets: ``{parameter: (flag, is a switch)}``."""
    flags: dict[str, tuple[str, bool]] = {}
    for action in parser._actions:
        longest = max(action.option_strings, key=len, default=None)
        if longest is not None and action.dest not in flags:
            flags[action.dest] = (longest, isinstance(action, argparse._StoreTrueAction))
    for parameter, dest in _DESTINATIONS.items():
        if dest in flags:
            flags.setdefault(parameter, flags[dest])
    return flags


def _positionals_of(parser: argparse.ArgumentParser) -> set[str]:
    """The parameters a positional argument of ``parser`` gives (``run_dir`` for calibrate's
    RUN_DIR, whose destination is ``checkpoint``), none of them a flag."""
    dests = {a.dest for a in parser._actions
             if not a.option_strings and not isinstance(a, argparse._SubParsersAction)}
    return dests | {parameter for parameter, dest in _DESTINATIONS.items() if dest in dests}


def _literal(value: str) -> str:
    """A value's text: a repr's string, escapes undone (``'C:\\\\data'`` -> ``C:\\data``), or the
    bare word as it is."""
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        try:
            return str(ast.literal_eval(value))
        except (ValueError, SyntaxError):
            return value[1:-1]
    return value


def _as_command(m: re.Match[str], sub: argparse.ArgumentParser) -> str:
    """A matched :data:`_CALL` as its command line, each value quoted for a POSIX shell."""
    given = {name: _literal(value) for name, value in
             (a.split("=", 1) for a in re.findall(_ARGUMENT, m.group("args")))}
    # what the command cannot run without, filled from the call where it names them: its
    # positionals, its required flags and the first flag of each required either-or group
    # (--prompts FILE | --classes NAMES); a placeholder (DIR) is a word to replace, not quoted
    needed = [a for a in sub._actions if a.required and not isinstance(a, argparse._SubParsersAction)]
    needed += [g._group_actions[0] for g in sub._mutually_exclusive_groups if g.required]
    words = ["hybridcls", m.group("name")]
    for action in needed:
        value = shlex.quote(given.pop(action.dest)) if action.dest in given else (
            action.metavar or action.dest.upper())
        words.append(value if not action.option_strings
                     else f"{max(action.option_strings, key=len)} {value}")
    flags = _flags_of(sub)
    for name, value in given.items():
        flag, is_switch = flags.get(name, (None, False))
        if flag is None:
            words.append(f"{name}={shlex.quote(value)}")
        elif is_switch:
            words.append(flag if value == "True" else f"no {flag}")
        else:
            words.append(f"{flag} {shlex.quote(value)}")
    return "`" + " ".join(words) + "`"


def flag_message(message: str, parser: argparse.ArgumentParser,
                 commands: Mapping[str, argparse.ArgumentParser] | None = None) -> str:
    """``message`` with every ``parameter=value`` of a flag of ``parser`` written as that flag.

    Args:
        message: A library error's text (it names Python parameters).
        parser: The subcommand's parser, whose flags' destinations name the parameters.
        commands: Every subcommand's parser, by name: a call of a method that has a command
            (``calibrate(data_dir=DIR)``, ``HybridClassifier.calibrate()``) becomes that
            command, its positional arguments' placeholders and its flags
            (```hybridcls calibrate RUN_DIR --data DIR```).

    Returns:
        The text a command-line user reads: ``batch_size=0: ...`` becomes
        ``--batch-size 0: ...``, ``truncate_prompts=True`` becomes ``--truncate-prompts``,
        a positional argument's ``data_dir='data/train'`` its value ``data/train``;
        ``load_run(run_dir=RUN_DIR, prompts=FILE)`` becomes this command's
        ```--checkpoint RUN_DIR --prompts FILE```, and a class list's place
        (``<prompts list>:2``, :data:`~hybridcls.zeroshot.prompts.PROMPTS_LIST`) becomes
        ``--classes name 2`` in a command that has ``--classes``.

    Example:
        >>> p = argparse.ArgumentParser()
        >>> _ = p.add_argument("--batch-size", type=int)
        >>> _ = p.add_argument("--truncate-prompts", action="store_true")
        >>> flag_message("batch_size=0: expected a positive integer", p)
        '--batch-size 0: expected a positive integer'
        >>> flag_message("or pass truncate_prompts=True to accept the cut", p)
        'or pass --truncate-prompts to accept the cut'
        >>> flag_message("runs/batch_size=3: run directory not found", p)  # a path stays
        'runs/batch_size=3: run directory not found'
        >>> _ = p.add_argument("data_dir")
        >>> flag_message("data_dir='data/train': folder not found", p)  # a positional: its value
        'data/train: folder not found'
    """
    flags = _flags_of(parser)
    positionals = _positionals_of(parser)
    names = set(flags) | {name for name, _ in _SWITCHES}

    def rewrite(m: re.Match[str]) -> str:
        name, value = m.group(1), m.group(2)
        if name not in names:
            # a positional argument is its value: calibrate's RUN_DIR is the folder itself
            return _literal(value) if name in positionals else m.group(0)
        if (name, value) in _SWITCHES:
            return _SWITCHES[(name, value)]
        flag, is_switch = flags.get(name, (None, False))
        if flag is None:
            return m.group(0)
        if is_switch:
            return flag if value == "True" else f"no {flag}"
        return f"{flag} {_literal(value)}"

    if commands:
        message = _CALL.sub(lambda m: _as_command(m, commands[m.group("name")]), message)
    message = _LOAD_CALL.sub(lambda m: _as_flags(m, flags), message)
    if "classes" in flags:  # the classes' list is --classes' (the only list the command line gives)
        message = _PROMPTS_LIST.sub(
            lambda m: flags["classes"][0] + (f" name {m.group(1)}" if m.group(1) else ""), message)
    return _PARAMETER.sub(rewrite, message)


def _as_flags(m: re.Match[str], flags: Mapping[str, tuple[str, bool]]) -> str:
    """A matched :data:`_LOAD_CALL` as the running command's flags that do the same: its
    parameters as flags (``run_dir`` is ``--checkpoint``), each value quoted for a POSIX shell;
    the call as it is when the command has no flag for one of them."""
    given = [a.split("=", 1) for a in re.findall(_ARGUMENT, m.group("args"))]
    words = []
    for name, value in given:
        flag, _ = flags.get(name, (None, False))
        if flag is None:
            return m.group(0)
        literal = _literal(value)
        words.append(f"{flag} {literal if literal.isupper() else shlex.quote(literal)}")
    return "`" + " ".join(words) + "`"
