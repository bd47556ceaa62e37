"""The decision flags ``predict`` and ``explain`` share: their definitions, their up-front checks,
and the classifier they build, so that ``explain`` shows the decision ``predict`` makes.

``--unknown-threshold``, the roll-up (``--rollup-threshold`` / ``--rollup-precision``), the
class lists (``--allowed-classes``, ``--site-classes``), the few-shot ``--support`` images and
the hybrid's ``--mode`` and ``--cascade`` are declared once here (:func:`add_decision_arguments`),
checked before any model loads (:func:`check_decision_arguments`, :func:`check_topk_argument`,
:func:`site_classes_from_args`) and handed to the classifier in one place
(:func:`classifier_from_args`). ``--checkpoint`` (a run directory, a ``save_pretrained`` folder or
its Hub repo id, ``--revision``) is read once, before them (:func:`saved_folder_prompts`); a saved
folder loads with :func:`saved_folder_hybrid`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hybridcls.cli.common import (
    UsageError,
    class_list,
    hybrid_from_args,
    hybrid_parameters,
    prompts_from_args,
    zeroshot_from_args,
)
from hybridcls.gate.config import MODES

__all__ = [
    "add_decision_arguments",
    "add_revision_argument",
    "add_topk_argument",
    "check_decision_arguments",
    "check_topk_argument",
    "classifier_from_args",
    "rollup_given",
    "saved_folder_hybrid",
    "saved_folder_prompts",
    "site_classes_from_args",
]


def saved_folder_prompts(args: argparse.Namespace) -> str | None:
    """The prompts ``--checkpoint`` carries, for ``predict`` and ``explain``: a ``save_pretrained``
    folder's ``prompts.txt``, or None (a run directory, or no ``--checkpoint``: ``--prompts`` /
    ``--classes`` name the classes).

    A ``--checkpoint`` that is no folder here is a Hugging Face Hub repo id (``ORG/NAME``,
    ``hf-hub:ORG/NAME``), fetched as :meth:`~hybridcls.HybridClassifier.from_pretrained` fetches
    it (:func:`hybridcls.hub.pretrained_folder`: ``--revision``, ``--cache-dir`` as the Hub cache
    too, nothing downloaded when ``HF_HUB_OFFLINE`` is set); ``args.checkpoint`` becomes its
    snapshot's folder, which every later reader of the flag reads. A folder here wins over a
    repo id of the same spelling.

    Raises:
        UsageError: A ``--checkpoint`` that is neither a folder here nor a repo id in the cache
            or on the Hub (named, with why), a repo that is not a ``save_pretrained`` folder;
            ``--revision`` without a repo id; a run directory without ``--prompts`` /
            ``--classes``; a saved folder with ``--prompts``, ``--classes``, ``--clip-model`` or
            ``--templates``: the folder fixes them (its class-text matrix is built from them,
            its gate's support images are labelled by its classes); with ``--truncate-prompts``:
            the folder holds that matrix, built when it was saved. A repo id, which can only
            be a saved folder, is refused those flags before anything is fetched, by the name
            given.
        CheckpointError: A saved folder whose files are missing or disagree
            (:func:`hybridcls.pretrained.read_saved_folder`), named as its own, before any
            model loads.
    """
    from hybridcls.errors import CheckpointError, WeightsUnavailableError
    from hybridcls.hub import hub_repo_id, pretrained_folder
    from hybridcls.pretrained import HYBRID_FILE, PROMPTS_FILE, is_saved_folder, read_saved_folder

    checkpoint, revision = args.checkpoint, getattr(args, "revision", None)
    if revision is not None and (not checkpoint or Path(checkpoint).is_dir()):
        raise UsageError(f"--revision {revision}: " + (
            f"--checkpoint {checkpoint} is a folder here; --revision chooses a version of a Hub repo"
            if checkpoint else "needs --checkpoint ORG/NAME, a Hugging Face Hub repo id"))
    if not checkpoint:
        if not prompts_from_args(args):
            raise UsageError("--prompts or --classes is needed")
        return None
    if not Path(checkpoint).is_dir():
        if Path(checkpoint).exists():
            raise UsageError(f"--checkpoint {checkpoint}: a file, not a folder (a run directory, "
                             "or a folder from save_pretrained)")
        try:
            hub_repo_id(checkpoint)
            # a repo id can only be a saved folder: what it fixes is refused before any download
            _refuse_what_a_saved_folder_fixes(
                args, f"--checkpoint {checkpoint} (no folder here: a Hugging Face Hub repo, which "
                      "can only be a save_pretrained folder)",
                lambda flag, purpose: (f"use the repo as it is, without {flag}, or, {purpose}, give "
                                       "the run directory it was saved from as --checkpoint, with "
                                       "--prompts, if you have it (the repo holds none)"))
            folder = pretrained_folder(checkpoint, revision=revision, cache_dir=args.cache_dir)
        except (CheckpointError, WeightsUnavailableError) as exc:
            # its messages start with the name given
            raise UsageError(f"--checkpoint {exc}") from None
        if not is_saved_folder(folder):
            raise UsageError(f"--checkpoint {checkpoint}: the Hub repo holds no {HYBRID_FILE}: "
                             "not a folder from save_pretrained")
        args.checkpoint = str(folder)
        read_saved_folder(folder)  # its files agree, before the prompts file is read as ours
        return str(folder / PROMPTS_FILE)
    if not is_saved_folder(checkpoint):
        if not prompts_from_args(args):
            raise UsageError(f"--prompts or --classes is needed: {checkpoint} is a run directory, "
                             "not a save_pretrained folder (which carries its prompts)")
        return None
    _refuse_what_a_saved_folder_fixes(
        args, f"the save_pretrained folder {checkpoint}",
        lambda flag, purpose: f"give the run directory it was saved from as --checkpoint, with "
                              f"--prompts, {purpose}")
    read_saved_folder(checkpoint)  # its files agree, before the prompts file is read as ours
    return str(Path(checkpoint) / PROMPTS_FILE)


def _refuse_what_a_saved_folder_fixes(args: argparse.Namespace, folder: str,
                                      advice: Callable[[str, str], str]) -> None:
    """Refuse ``--prompts``, ``--classes``, ``--clip-model``, ``--templates`` and
    ``--truncate-prompts`` with a saved folder (:func:`saved_folder_prompts`).

    Args:
        args: The parsed flags.
        folder: The folder as the message names it.
        advice: ``(flag, purpose)`` -> what the user can do instead, ``purpose`` being
            "to change them" or "to build the class texts again".

    Raises:
        UsageError: One of those flags given, with the reason and ``advice``.
    """
    classes = getattr(args, "classes", None)
    for flag, value in (("--prompts", args.prompts), ("--classes", classes and ",".join(classes)),
                        ("--clip-model", args.clip_model), ("--templates", args.templates)):
        if value is not None:
            raise UsageError(f"{flag} {value}: {folder} fixes its CLIP model, prompts and "
                             "templates (its class-text matrix is built from them); "
                             + advice(flag, "to change them"))
    if args.truncate_prompts:
        raise UsageError(f"--truncate-prompts: {folder} holds its class-text matrix as it was "
                         "saved (long class texts were cut then, or refused); "
                         + advice("--truncate-prompts", "to build the class texts again"))


def add_revision_argument(group: argparse._ActionsContainer) -> None:
    """``--revision``: the version of a Hub repo given as ``--checkpoint``
    (:meth:`~hybridcls.HybridClassifier.from_pretrained`'s ``revision``)."""
    group.add_argument("--revision", default=None, metavar="REV",
                       help="with a Hugging Face Hub repo id as --checkpoint: its branch, tag or "
                            "commit (default: main)")


def saved_folder_hybrid(args: argparse.Namespace) -> Any:
    """The hybrid a ``save_pretrained`` folder given as ``--checkpoint`` without ``--prompts``
    loads, for :func:`classifier_from_args`' ``hybrid``: ``HybridClassifier.from_pretrained``
    with the runtime and decision flags, so that the rows are made with the class-text matrix
    the folder holds (``predict`` and ``explain`` alike). Of the CLIP flags only
    ``--clip-pretrained`` can reach it (the weights may be kept elsewhere here; their fingerprint
    is checked): :func:`saved_folder_prompts` refused the others.
    """
    # the models (torch, timm, open_clip) are imported when the command runs
    from hybridcls.hybrid import HybridClassifier

    given = {} if args.clip_pretrained is None else {"clip_pretrained": args.clip_pretrained}
    return HybridClassifier.from_pretrained(args.checkpoint, **given, **hybrid_parameters(args))


def add_decision_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The "decision" group: ``--unknown-threshold``, the roll-up, the class lists, ``--support``,
    and the hybrid's ``--mode`` and ``--cascade`` (refused without ``--checkpoint``:
    :func:`check_decision_arguments`).

    Returns:
        The group, for a command's own decision flags.
    """
    dec = parser.add_argument_group("decision")
    dec.add_argument("--unknown-threshold", type=float, default=None, metavar="P",
                     help="answer 'unknown' when no branch's top probability reaches P "
                          "(both modes; default: the calibrated value, off)")
    dec.add_argument("--rollup-threshold", type=float, default=None, metavar="T",
                     help="roll up: when the best class's probability is below T, answer the "
                          "deepest ancestor (from the prompts file's '> PARENT > ...') whose summed "
                          "probability reaches T; rows get 'rank' and 'leaf' columns (docs/prompts.md)")
    dec.add_argument("--rollup-precision", type=float, default=None, metavar="P",
                     help="roll up with the smallest threshold whose answers are right at their rank "
                          "a share P of the time on the run's held-out seen images (needs "
                          "--checkpoint; not with --rollup-threshold)")
    dec.add_argument("--allowed-classes", type=class_list, default=None, metavar="NAMES",
                     help='limit every prediction to these classes of the prompts file, '
                          'comma-separated: --allowed-classes "fox,moose"; the others get '
                          'probability 0 (docs/sites.md)')
    dec.add_argument("--site-classes", default=None, metavar="FILE",
                     help="CSV of path prefixes (or site names, which a .csv list file's 'site' "
                          "column names per image) and their allowed classes: each input is "
                          "limited to its site's classes; one that allows none is an error row "
                          "(docs/sites.md)")
    dec.add_argument("--support", metavar="DIR", default=None,
                     help="a few labelled images per class (one subfolder per class of --prompts, "
                          "seen or unseen), joined to the zero-shot scores and the gate without "
                          "retraining (both modes; docs/gate.md, 'Few-shot support')")
    dec.add_argument("--mode", choices=MODES, default=None,
                     help="override the calibrated decision mode (needs --checkpoint)")
    dec.add_argument("--cascade", action="store_true",
                     help="run CLIP only where the supervised branch is not already sure "
                          "(thresholds fitted by `hybridcls calibrate`; needs --checkpoint): the "
                          "images it skips are answered by the supervised branch alone")
    return dec


def rollup_given(args: argparse.Namespace) -> bool:
    """Whether a roll-up flag is given."""
    return args.rollup_threshold is not None or args.rollup_precision is not None


def check_decision_arguments(args: argparse.Namespace, prompts: Any = None) -> None:
    """What only the command line can get wrong in the decision flags, before any model loads.

    Args:
        args: The parsed flags (:func:`add_decision_arguments`'s and ``--checkpoint``).
        prompts: The classes the checks read (default: ``--prompts`` / ``--classes``); None:
            the ancestors are checked where the classifier is built.

    Raises:
        UsageError: ``--mode`` or ``--cascade`` without ``--checkpoint``; a ``--support`` that
            is no folder; ``--rollup-precision`` without ``--checkpoint`` or with
            ``--rollup-threshold``; a roll-up flag with a prompts file that names no ancestors;
            ``--cascade`` with a class list.
    """
    if not args.checkpoint:
        for flag, value in (("--mode", args.mode), ("--cascade", args.cascade)):
            if value not in (None, False):
                raise UsageError(f"{flag} needs --checkpoint: a zero-shot-only prediction has no "
                                 "supervised branch to route to, mix with or decide with")
    if args.support and not Path(args.support).is_dir():
        what = "is a file, not a folder" if Path(args.support).exists() else "no such folder"
        raise UsageError(f"--support {args.support}: {what} (one subfolder of images per class)")
    if args.rollup_precision is not None and not args.checkpoint:
        raise UsageError("--rollup-precision needs --checkpoint: the threshold is chosen on the run's "
                         "held-out seen images; without one, set --rollup-threshold T")
    if args.rollup_precision is not None:  # those images' folder, before any model loads
        from hybridcls.hybrid import check_training_folder

        check_training_folder(args.checkpoint)
    if args.rollup_threshold is not None and args.rollup_precision is not None:
        raise UsageError("--rollup-threshold and --rollup-precision: give one (the precision "
                         "chooses the threshold)")
    if rollup_given(args):
        from hybridcls.zeroshot.prompts import as_prompt_set

        prompts = prompts if prompts is not None else prompts_from_args(args)
        if prompts is not None and not as_prompt_set(prompts).has_ancestors:
            flag = "--rollup-threshold" if args.rollup_threshold is not None else "--rollup-precision"
            raise UsageError(f"{flag} needs ancestors in the prompts file (a class line ending "
                             "'> PARENT > ...', docs/prompts.md): there is nothing to roll up to")
    if args.cascade and (args.allowed_classes or args.site_classes):
        raise UsageError(f"--cascade with --{'allowed' if args.allowed_classes else 'site'}-classes: "
                         "the cascade decides from the confidence over every seen class before "
                         "a class list could apply; use one of them")


def add_topk_argument(group: argparse._ActionsContainer, listed: str) -> None:
    """``--topk``, checked by :func:`check_topk_argument`.

    Args:
        group: Where the flag goes.
        listed: What K counts in this command (``"top-k labels per row"``).
    """
    from hybridcls.outputs import DEFAULT_TOPK

    group.add_argument("--topk", type=int, default=None, metavar="K",
                       help=f"{listed}, at most the number of classes (default: {DEFAULT_TOPK}, or "
                            "every class when there are fewer); an answer limited to fewer classes "
                            "lists the others after them, at probability 0")


def check_topk_argument(args: argparse.Namespace, prompts: Any = None) -> None:
    """``--topk`` against the classes the prompts name, before any model loads (a larger one
    would leave top-k columns that no class fills in any row), and set: not given, the
    default, or every class when there are fewer.

    Args:
        args: The parsed flags; ``args.topk`` is set to the number of columns.
        prompts: The classes (default: ``--prompts`` / ``--classes``).

    Raises:
        ParameterError: ``topk`` out of range, naming the prompts (shown as ``--topk``).
    """
    from hybridcls.outputs import check_topk
    from hybridcls.zeroshot.prompts import as_prompt_set

    prompts = prompts if prompts is not None else prompts_from_args(args)
    named_by = "--classes" if isinstance(prompts, list) else prompts
    args.topk = check_topk(args.topk, len(as_prompt_set(prompts).names), f"that {named_by} names")


def site_classes_from_args(args: argparse.Namespace, sources: Any = None, prompts: Any = None) -> Any:
    """``--site-classes`` read, bound to the ``site`` column of the .csv inputs, and checked
    against the prompts file: before any model loads, a problem names the file and line.

    Args:
        args: The parsed flags.
        sources: Every input, expanded: a site file row that reaches none of them is a warning,
            once (a shard or a resume predicts a share of them).
        prompts: The classes to check the names against (default: ``--prompts`` / ``--classes``).

    Returns:
        The checked :class:`~hybridcls.sites.SiteClasses`, or None without ``--site-classes``.

    Raises:
        ParameterError: An ``--allowed-classes`` name that is no class.
        PromptFileError: A site file problem (names the file and line).
    """
    from hybridcls.sites import allowed_columns, read_site_classes
    from hybridcls.zeroshot.prompts import as_prompt_set

    if not (args.site_classes or args.allowed_classes):
        return None
    prompts = as_prompt_set(prompts if prompts is not None else prompts_from_args(args))
    if args.allowed_classes:
        allowed_columns(args.allowed_classes, prompts)
    if not args.site_classes:
        return None
    sites = read_site_classes(args.site_classes, parameter="site_classes").for_inputs(args.inputs)
    sites.resolve(prompts)
    return sites if sources is None else sites.check_reach(sources)


def classifier_from_args(args: argparse.Namespace, site_classes: Any, *, hybrid: Any = None) -> Any:
    """The fitted classifier ``predict`` (and ``explain``) runs: the hybrid with ``--checkpoint``,
    else zero-shot only, with the roll-up flags and the class lists of ``--allowed-classes`` and
    ``--site-classes``; ``--unknown-threshold``, ``--support`` (and ``--mode``, ``--cascade``
    where the command has them) go in where it is built (:func:`hybrid_from_args`).

    Args:
        args: The parsed flags.
        site_classes: ``--site-classes`` as :func:`site_classes_from_args` read and checked it
            on every input (None: no site file).
        hybrid: A hybrid already built from the other flags (a ``save_pretrained`` folder's,
            :func:`saved_folder_hybrid`); default: build it here.
    """
    rollup = {"rollup_threshold": args.rollup_threshold, "rollup_precision": args.rollup_precision}
    if hybrid is not None:
        clf = hybrid.set_params(**rollup)
    elif args.checkpoint:
        clf = hybrid_from_args(args, **rollup)
    else:
        clf = zeroshot_from_args(args).set_params(rollup_threshold=args.rollup_threshold)
    return clf.set_params(allowed_classes=args.allowed_classes, site_classes=site_classes)
