"""Sharing a saved classifier through the Hugging Face Hub, with huggingface_hub doing the work.

* :func:`pretrained_folder`: a saved folder as it is, or a Hub repo id
  (``ORG/NAME``, also spelled ``hf-hub:ORG/NAME`` as open_clip does) fetched
  with ``huggingface_hub.snapshot_download`` into the Hugging Face cache:
  nothing is downloaded when ``HF_HUB_OFFLINE`` is set or ``local_files_only``
  is asked for, and a repo that is not in the cache then is an error naming it;
* :func:`hub_repo_id`: whether a name is a repo id at all, asked of no server;
* :func:`upload_folder`: ``HfApi.create_repo`` + ``HfApi.upload_folder``;
* :func:`model_card`: the folder's ``README.md``, the Hub's model card
  (``huggingface_hub.ModelCard`` with ``ModelCardData`` metadata): the classes,
  the models, the calibrated gate and its held-out figures, intended use and limits.

huggingface_hub's ``ModelHubMixin`` is not used: its ``save_pretrained`` writes
a ``config.json`` of the ``__init__`` arguments (the checkpoint's ``config.json``
is another file), and its ``from_pretrained`` passes that file's keys back to
``__init__`` (the checkpoint's ``"model"`` would become the estimator's
``model`` parameter). The folder format is :mod:`hybridcls.pretrained`'s.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hybridcls.errors import CheckpointError, ParameterError, WeightsUnavailableError
from hybridcls.version import __version__
from hybridcls.zeroshot.defaults import LOCAL_DIR_PREFIX

__all__ = ["HUB_PREFIX", "hub_repo_id", "model_card", "pretrained_folder", "upload_folder"]

#: How open_clip spells a Hub model; accepted here too.
HUB_PREFIX = "hf-hub:"


def pretrained_folder(name_or_path: str | os.PathLike[str], *, revision: str | None = None,
                      cache_dir: str | os.PathLike[str] | None = None, local_files_only: bool = False,
                      token: str | bool | None = None) -> Path:
    """The local folder of a saved classifier: a folder as given, or a Hub repo's snapshot.

    Args:
        name_or_path: A folder written by ``save_pretrained``, or a Hub repo id
            (``ORG/NAME`` or ``hf-hub:ORG/NAME``). An existing folder wins.
        revision: A Hub branch, tag or commit (default: ``main``); refused with a folder.
        cache_dir: The Hugging Face cache to use (default: huggingface_hub's,
            ``HF_HUB_CACHE``).
        local_files_only: Use the cache only, never the network (as ``HF_HUB_OFFLINE=1`` does).
        token: A Hub token for a private repo (default: huggingface_hub's login).

    Returns:
        The folder (for a repo: its snapshot in the cache, ``models--ORG--NAME/snapshots/REV``).

    Raises:
        CheckpointError: Neither a folder nor a valid repo id; a file, not a folder.
        ParameterError: ``revision`` with a local folder.
        WeightsUnavailableError: The repo is not in the cache and may not be downloaded
            (offline), or cannot be downloaded (names the repo id and the cache).
    """
    path = Path(name_or_path)
    if path.is_dir():
        if revision is not None:
            raise ParameterError("revision", revision, f"{path} is a local folder; revision= "
                                 "chooses a version of a Hub repo")
        return path
    if path.exists():
        raise CheckpointError(f"{path}: a file, not the folder of a saved HybridClassifier")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    # loading holds the offline rules of the whole package (torch is loaded by now anyway)
    from hybridcls.zeroshot.loading import hub_offline, hub_offline_scope

    repo_id = hub_repo_id(name_or_path)
    offline = hub_offline()
    where = f"cache {cache_dir}" if cache_dir is not None else "Hugging Face cache"
    try:
        # local_files_only alone still lets huggingface_hub 2.x fetch its request headers' data
        with hub_offline_scope(offline or local_files_only):
            folder = snapshot_download(
                repo_id, revision=revision, cache_dir=cache_dir, token=token,
                local_files_only=offline or local_files_only,
                library_name="hybridcls", library_version=__version__)
    except LocalEntryNotFoundError as exc:
        # huggingface_hub raises this one too when downloads are on but the Hub cannot be reached
        why = ("downloads are off (HF_HUB_OFFLINE is set)" if offline else
               "downloads are off (local_files_only=True)" if local_files_only else
               "the Hub cannot be reached")
        raise WeightsUnavailableError(
            f"{repo_id}: no such local folder, and the Hub repo is not in the {where}"
            f"{f' at revision {revision}' if revision else ''} while {why}; "
            + ("unset HF_HUB_OFFLINE and run once with network access to cache it"
               if offline else "run once with network access to cache it")
            + ", or pass the folder of a saved HybridClassifier (check its spelling if it "
            "is one)") from exc
    except Exception as exc:  # huggingface_hub's HTTP and repository errors: say which repo
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise WeightsUnavailableError(
            f"{repo_id}: no such local folder, and the Hub repo cannot be downloaded ({first})"
        ) from exc
    return Path(folder)


def hub_repo_id(name: str | os.PathLike[str]) -> str:
    """The Hub repo id ``name`` spells (``hf-hub:`` taken off), checked without the network.

    Raises:
        CheckpointError: Not a valid repo id (named as given).
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo_id = os.fspath(name).removeprefix(HUB_PREFIX)
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise CheckpointError(f"{name}: no such folder, and not a Hugging Face Hub repo id "
                              "(ORG/NAME)") from None
    return repo_id


def upload_folder(folder: str | os.PathLike[str], repo_id: str, *, private: bool | None = None,
                  token: str | bool | None = None, revision: str | None = None,
                  commit_message: str = "Upload hybridcls classifier",
                  create_pr: bool = False) -> Any:
    """Create the Hub repo if needed and upload ``folder`` into it as one commit.

    Args:
        folder: A saved classifier's folder.
        repo_id: ``ORG/NAME`` (``hf-hub:`` allowed).
        private: Create the repo private (an existing repo keeps its visibility).
        token: A Hub token (default: huggingface_hub's login).
        revision: The branch to commit to (default: ``main``).
        commit_message: The commit's message.
        create_pr: Open a pull request instead of committing to the branch.

    Returns:
        huggingface_hub's ``CommitInfo`` (``commit_url``, ``oid``...).
    """
    from huggingface_hub import HfApi

    repo_id = repo_id.removeprefix(HUB_PREFIX)
    api = HfApi(token=token, library_name="hybridcls", library_version=__version__)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    return api.upload_folder(repo_id=repo_id, folder_path=os.fspath(folder), repo_type="model",
                             revision=revision, commit_message=commit_message, create_pr=create_pr)


def _percent(value: Any) -> str:
    return "n/a" if value is None else f"{100 * float(value):.1f}%"


def _bullets(items: Sequence[str]) -> str:
    return "\n".join(f"- {item}" for item in items) if items else "- (none)"


def _portable(name: str) -> str:
    """A model id or weights file as the card shows it: a local folder or file by its name only
    (the card travels; this machine's paths do not), a Hub id or a tag as it is."""
    if name.startswith(LOCAL_DIR_PREFIX):
        return LOCAL_DIR_PREFIX + Path(name.removeprefix(LOCAL_DIR_PREFIX)).name
    if name.startswith(HUB_PREFIX) or not ("/" in name or "\\" in name):
        return name
    return Path(name).name


def model_card(*, classes: Sequence[str], n_seen: int, config: Mapping[str, Any],
               clip: Mapping[str, Any], gate: Mapping[str, Any] | None, model_version: str,
               repo_id: str | None = None) -> str:
    """The model card (``README.md``) of a saved classifier: metadata, then what a user needs.

    Args:
        classes: Every class, seen first (``classes_``).
        n_seen: How many are seen.
        config: The supervised checkpoint's ``config.json`` (``model``, ``weights``,
            ``data_config``, ``split``).
        clip: ``clip_model``, ``clip_pretrained``, ``clip_fingerprint``.
        gate: :meth:`hybridcls.gate.Gate.summary` of the calibrated gate (None: not calibrated).
        model_version: :func:`hybridcls.provenance.model_version`.
        repo_id: The Hub repo the card is for, shown in its example (default: ``ORG/NAME``).

    Returns:
        The card's text: YAML metadata (``library_name: hybridcls``, ``pipeline_tag:
        image-classification``, tags, ``base_model`` for a CLIP from the Hub) and Markdown.
    """
    from huggingface_hub import ModelCard, ModelCardData

    clip_id = str(clip.get("clip_model"))
    base = clip_id.removeprefix(HUB_PREFIX) if clip_id.startswith(HUB_PREFIX) else None
    pretrained = clip.get("clip_pretrained")
    data = ModelCardData(
        library_name="hybridcls", pipeline_tag="image-classification", base_model=base,
        tags=["hybridcls", "image-classification", "zero-shot-image-classification",
              "open-set-recognition", "timm", "open_clip"])
    seen, unseen = list(classes[:n_seen]), list(classes[n_seen:])
    model = config.get("model", {})
    weights = config.get("weights", {})
    origin = weights.get("tag") or weights.get("file") or ""
    initial = ("random (no pretrained weights)" if weights.get("source") in (None, "none")
               else f"{weights.get('source')} {origin}".rstrip())
    size = config.get("data_config", {}).get("input_size")
    lines = [
        f"# hybridcls open-set classifier: {len(seen)} seen + {len(unseen)} unseen classes",
        "",
        ("A [hybridcls](https://pypi.org/project/hybridcls/) classifier: a fine-tuned timm backbone "
         "for the classes it had training images of (seen), open_clip zero-shot for every class, "
         "and a gate, calibrated on seen images only, that decides which branch answers."),
        "",
        (f"`model_version`: `{model_version}` (both towers' weights, the gate and the class texts; "
         "`hybridcls predict --model-version` writes it in every row)."),
        "",
        "## Use",
        "",
        "```python",
        "from hybridcls import HybridClassifier",
        "",
        f'clf = HybridClassifier.from_pretrained("{repo_id or "ORG/NAME"}")  # or a saved folder',
        'clf.predict(["photo.jpg", "folder/"])',
        "```",
        "",
        "## Classes",
        "",
        f"Seen ({len(seen)}; the supervised branch and the zero-shot branch):",
        "",
        _bullets(seen),
        "",
        f"Unseen ({len(unseen)}; named only, answered by the zero-shot branch):",
        "",
        _bullets(unseen),
        "",
        "## Models",
        "",
        (f"- supervised backbone: timm `{model.get('name')}` ({model.get('head')} head, input "
         f"{size}), fine-tuned from: {initial}"),
        (f"- CLIP: open_clip `{_portable(clip_id)}`"
         + (f" / `{_portable(pretrained)}`" if pretrained else "")
         + f" (weights SHA-256 `{clip.get('clip_fingerprint')}`)"),
        ("- `config.json` also carries timm's `architecture`, `num_classes`, `label_names` and "
         "`pretrained_cfg`: `model.safetensors` holds the backbone under `backbone.` and the "
         "head under `head.`"),
        "",
        "## The gate",
        "",
    ]
    if gate is None:
        lines.append("Not calibrated: run `hybridcls calibrate` before predicting.")
    else:
        unknown = gate["unknown_threshold"]
        lines += [
            (f"- calibration: `{gate['method']}`; score `{gate['score']}`, mode `{gate['mode']}`, "
             f"threshold {gate['threshold']:.4g} (keeps at least {_percent(gate['tpr'])} of the "
             "held-out seen images on the seen side)"),
            (f"- cache branch: {gate['cache_branch'] or 'not fitted'}; 'unknown' answered: "
             + ("never" if unknown is None else f"below a top probability of {unknown:g}")),
        ]
        held = gate.get("held_out") or {}
        lines += ["", ("Held-out figures from calibration (seen-class images the backbone was not "
                       "trained on; no unseen images were used):"), ""]
        if "mean_h" in held:
            lines.append(
                f"- leave-classes-out ({held.get('rounds')} stand-in problems hiding "
                f"{held.get('hidden_classes')} seen class(es) each): H {_percent(held['mean_h'])} "
                f"(std {_percent(held.get('std_h'))}), seen {_percent(held.get('mean_seen'))}, "
                f"stand-in unseen {_percent(held.get('mean_unseen'))}")
        if "n_val" in held:
            lines.append(
                f"- seen-class accuracy on {held['n_val']} held-out images: "
                f"{_percent(held.get('accuracy_without_cache'))} without the cache branch, "
                f"{_percent(held.get('accuracy_with_cache'))} with it")
        if "mean_h" not in held and "n_val" not in held:
            lines.append("- none recorded")
    lines += [
        "",
        "## Intended use and limits",
        "",
        ("- Intended for sorting images into the classes listed above, where some classes have no "
         "training images; evaluate it on labelled images of your own before relying on it "
         "(`hybridcls evaluate`)."),
        ("- The unseen classes are only as good as the CLIP model's zero-shot recognition of their "
         "names; classes that look alike or are named vaguely are confused."),
        ("- The gate was calibrated without unseen images: its held-out figures are estimates on "
         "stand-in problems made of seen classes, not measurements on the real unseen classes."
         if not (gate or {}).get("support") else
         f"- {gate['support'].get('n_support', 'Some')} few-shot support images "
         f"({', '.join(f'{k}: {v}' for k, v in gate['support'].get('counts', {}).items())}) join "
         "the zero-shot scores (Tip-Adapter caches) and set the gate's threshold again; the other "
         "held-out figures are estimates on stand-in problems made of seen classes."),
        ("- Every image gets one of the listed classes (or 'unknown' when that option is set): "
         "images of classes outside the list are forced into the nearest one."),
        ("- The supervised branch was trained on the images of one dataset; photos from another "
         "source (camera, season, region) may shift its accuracy and the gate's threshold."),
        "",
    ]
    text = "---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(lines)
    return str(ModelCard(text))
