"""``HybridClassifier``: the supervised branch, the zero-shot branch and the gate, as one estimator.

A thin scikit-learn estimator over the package's parts: :meth:`fit` trains
the supervised branch (:func:`hybridcls.train.train`), :meth:`load_run` loads
it with the CLIP tower (:class:`~hybridcls.zeroshot.ClipTower`) into one
:class:`~hybridcls.engine.InferenceEngine`, :meth:`calibrate` runs the engine
over the run's seen images and fits a :class:`~hybridcls.gate.Gate` on them,
and prediction is :class:`~hybridcls.predictor.Predictor`'s, shared with the
zero-shot classifier. :meth:`save_pretrained` writes a self-contained folder
(:mod:`hybridcls.pretrained`).

Class order (``classes_``): the seen classes in training order, spelled as
in the prompts file, then the unseen classes in prompts-file order.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from hybridcls.cache import read_json
from hybridcls.data import Source, as_sources
from hybridcls.data.folders import check_folder
from hybridcls.device import resolve_device
from hybridcls.engine import ClipPolicy, InferenceEngine, timm_view
from hybridcls.errors import (
    CheckpointError,
    DatasetError,
    HybridclsError,
    HybridclsWarning,
    InputError,
    ParameterError,
)
from hybridcls.gate import GATE_FILENAME, INDEX_DIR, BranchOutputs, Gate
from hybridcls.gate.config import GateCalibration
from hybridcls.gate.gate import n_seen_mismatch
from hybridcls.gate.support import SUPPORT_FILE
from hybridcls.hierarchy import RollupCalibration, calibrate_threshold
from hybridcls.hub import pretrained_folder, upload_folder
from hybridcls.index import index_meta, run_index_meta
from hybridcls.outputs import BRANCH_COLUMNS
from hybridcls.predictor import Predictor, describe_failures
from hybridcls.pretrained import (
    HYBRID_FILE,
    PROMPTS_FILE,
    RESAVE,
    TEMPLATES_FILE,
    is_saved_folder,
    read_saved_folder,
    write_saved_folder,
)
from hybridcls.runtime import RuntimeSettings
from hybridcls.supervised import load_checkpoint
from hybridcls.supervised.checkpoint import CONFIG_FILE, checkpoint_identity
from hybridcls.support import refit_support, support_parameter
from hybridcls.train import TrainConfig, train
from hybridcls.train.data import recorded_image_check, resolve_training_data
from hybridcls.train.state import Divergence, diverged_training, unfinished_training
from hybridcls.zeroshot.defaults import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED
from hybridcls.zeroshot.gate_clip import (
    CLIP_PARAMETERS,
    clip_mismatch,
    clip_to_load,
    describe_clip,
    recorded_clip,
    templates_mismatch,
    templates_to_load,
)
from hybridcls.zeroshot.prompts import align_classes, as_prompt_set
from hybridcls.zeroshot.tower import ClipTower

__all__ = ["GATE_FILE", "INDEX_DIR", "HybridClassifier", "check_calibrated", "check_not_diverged",
           "check_training_folder"]

#: The gate's file in a run directory.
GATE_FILE = GATE_FILENAME

_R = RuntimeSettings  # the runtime parameters' defaults live there, once


def _diverged_weights(run_dir: str | os.PathLike[str], diverged: Divergence) -> str:
    """How every message about a run whose training diverged starts: where, and what it kept."""
    return (f"{run_dir}: its training diverged in {diverged.describe()}, so its weights are those "
            f"of epoch {diverged.best_epoch}, the best before it")


def _diverged_error(run_dir: str | os.PathLike[str]) -> CheckpointError | None:
    """Why no gate is calibrated on ``run_dir``: its training diverged (None: it did not).

    Its weights are those of the epoch before the loss broke, and no resume can finish the run
    (it would diverge again): a gate set on them would belong to a run that is to be replaced.
    ``train(resume=)`` and the benches refuse such a run for the same reason.
    """
    diverged = diverged_training(run_dir)
    if diverged is None:
        return None
    return CheckpointError(f"{_diverged_weights(run_dir, diverged)}, and no resume can finish it "
                           "(it would diverge again): a gate is not calibrated on such a run. "
                           f"Instead, {diverged.new_run()}, then calibrate that one")


def _uncalibrated(run_dir: str | os.PathLike[str]) -> CheckpointError:
    """A run without a gate: calibrate it, or (diverged) train a new one (:func:`_diverged_error`)."""
    return _diverged_error(run_dir) or CheckpointError(
        f"{run_dir}: the run has no {GATE_FILE}; calibrate it first with HybridClassifier.calibrate()")


def check_not_diverged(run_dir: str | os.PathLike[str]) -> None:
    """That a gate may be calibrated on a run: its training did not diverge. Reads the run's
    ``train_state.json`` only, so that ``calibrate`` can say so before any model loads; a folder
    without one (a ``save_pretrained`` folder, a checkpoint written by hand) passes.

    Raises:
        CheckpointError: The run's training diverged (:func:`hybridcls.train.state.diverged_training`):
            names the epoch and the command that trains a new run.
    """
    error = _diverged_error(run_dir)
    if error is not None:
        raise error


def check_calibrated(run_dir: str | os.PathLike[str]) -> None:
    """That a run directory can predict: it holds a ``gate.json``. Reads nothing but the folder's
    listing, so that a command can say so before it loads any model (loading the CLIP may mean
    a download); a folder that is no run at all is left to :meth:`HybridClassifier.load_run`,
    which names what it lacks.

    Raises:
        CheckpointError: A training run without a gate (calibrate it first; one whose training
            diverged: train a new run, :func:`check_not_diverged`).
    """
    run_dir = Path(run_dir)
    if (run_dir / CONFIG_FILE).is_file() and not (run_dir / GATE_FILE).is_file():
        raise _uncalibrated(run_dir)


def _recorded_folders(calibrated: str | None, trained: str | None) -> list[str]:
    """The training folders a run records, in the order held-out images are looked for in: the
    one an earlier ``calibrate`` recorded in ``gate.json`` (the run's had moved), then the run's
    own (``config.json``)."""
    return [os.fspath(f) for f in dict.fromkeys([calibrated, trained]) if f]


def _no_training_folder(run_dir: str | os.PathLike[str], recorded: Sequence[str]) -> HybridclsError:
    """The error of a run whose recorded training folders are all missing (or none recorded)."""
    if not recorded:
        return CheckpointError(f"{run_dir}: the run does not record its training folder; "
                               "give it with calibrate(data_dir=DIR)")
    return DatasetError(f"{run_dir}: its training folder is not here (looked for "
                        f"{' and '.join(recorded)}); give the folder where it is now with "
                        "calibrate(data_dir=DIR), which records it for later loads")


def check_training_folder(run_dir: str | os.PathLike[str],
                          data_dir: str | os.PathLike[str] | None = None) -> None:
    """That the training folder a run's held-out seen images are read from is here, before any
    model loads: ``data_dir`` when given, else a folder the run records (as
    :meth:`HybridClassifier.calibrate` and ``rollup_precision`` look for it). Reads the run's
    JSON files only; a folder that is no training run (a ``save_pretrained`` folder, or none at
    all) is left to the load, which names what it lacks.

    Raises:
        DatasetError: ``data_dir`` (named as ``data_dir=``) or every recorded folder is not here.
        CheckpointError: No ``data_dir`` and no folder recorded.
    """
    if data_dir is not None:
        check_folder(data_dir, parameter="data_dir")
        return
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file() or is_saved_folder(run_dir):
        return
    config = read_json(run_dir / CONFIG_FILE)
    gate = read_json(run_dir / GATE_FILE) if (run_dir / GATE_FILE).is_file() else {}
    if not isinstance(config, dict) or not isinstance(gate, dict):
        return  # not a run this reads: load_run names the file
    recorded = _recorded_folders(gate.get("data_dir"), config.get("data_dir"))
    if not any(Path(f).is_dir() for f in recorded):
        raise _no_training_folder(run_dir, recorded)


class HybridClassifier(Predictor, ClassifierMixin, BaseEstimator):
    """Open-set classifier: supervised for the seen classes, CLIP for the rest, a gate between.

    Args:
        model: timm architecture of the supervised branch (used by :meth:`fit`).
        clip_model: open_clip model id (built-in name, ``hf-hub:``, ``local-dir:``). None
            (the default): the CLIP the run's gate was calibrated with (``gate.json`` records
            it), else ``DEFAULT_CLIP_MODEL``. Another CLIP than the gate's is refused wherever
            the gate is used, until :meth:`calibrate` sets a gate on it
            (:mod:`hybridcls.zeroshot.gate_clip`).
        clip_pretrained: Pretrained tag or weights file for a built-in name (None: random
            weights). Left at its default with ``clip_model=None``, the gate's recorded one.
        prompts: Prompts file (or lines) naming every class, seen and unseen.
        templates: Templates file or list; None = the bundled default.
        method: Calibration (:meth:`calibrate`): ``"leave-classes-out"`` searches every
            score, mode and parameter on stand-in open-set problems made of the seen
            classes; ``"tpr"`` thresholds ``score`` in hard mode at ``tpr``.
        score: The gate score for ``method="tpr"``.
        tpr: Share of held-out seen images kept in the supervised branch (``method="tpr"``).
        rounds: Leave-classes-out's stand-in problems.
        seed: Seeds the hidden-class draws.
        cache_branch: The nearest-neighbour cache branch (Tip-Adapter style, see
            :mod:`hybridcls.gate.cache_branch`): ``"auto"`` fits it and keeps it only when
            it raises held-out seen-class accuracy, ``"on"`` keeps it, ``"off"`` does not fit
            it. The decision is stored with the gate and predictions follow it.
        mode: ``"hard"``, ``"soft"``, ``"stacking"``, or None for the calibrated mode.
        unseen_only: Hard routing: zero-shot over the unseen classes only (None = calibrated).
        unknown_threshold: Answer ``unknown`` when neither branch's top probability
            reaches it (None = calibrated, off by default).
        cascade: For gates that read CLIP's outputs: run CLIP only on images whose
            supervised confidence is at or below the calibrated ``cascade_msp``, or whose
            backbone features lie farther than ``cascade_distance`` from the training
            images'; the others are decided by the supervised branch alone.
        rollup_threshold: Roll-up (:mod:`hybridcls.hierarchy`): answer an ancestor from the
            prompts file when the best class's probability is below it (None: off).
        rollup_precision: Roll-up with the smallest threshold whose answers are correct at
            their rank this often on the run's held-out seen images
            (:meth:`calibrate_rollup`; None: off). Not with ``rollup_threshold``.
        truncate_prompts: Accept class texts longer than CLIP's context (cut, with a warning).
        allowed_classes: Class names every prediction is limited to (docs/sites.md).
        site_classes: A site file or :class:`~hybridcls.sites.SiteClasses`: each input is
            limited to its site's classes (:mod:`hybridcls.sites`); not with ``cascade=True``.
        support: Few-shot support images joined once the gate is calibrated (at load, and
            again after :meth:`calibrate`): a folder of a few images per class, any class of
            the prompts file (see :meth:`add_support`). ``None``: none.
        train_options: Options for :func:`hybridcls.train.train` (``epochs``...).
        device: Runtime setting (see :class:`~hybridcls.runtime.RuntimeSettings`, where
            every runtime parameter's default and meaning is given once).
        batch_size: Runtime setting.
        workers: Runtime setting.
        precision: Runtime setting.
        compile: Runtime setting.
        decode: Runtime setting.
        draft: Runtime setting.
        cache_dir: Runtime setting.
        progress: Runtime setting.

    Attributes:
        classes_: Seen classes (training order), then unseen ones (prompts order).
        n_seen_: Number of seen classes.
        seen_folders_: The seen classes as the training folders spell them.
        run_dir_: The supervised run directory.
        checkpoint_config_: Its ``config.json``.
        data_dir_: The training folder given to :meth:`calibrate` (``None``: the one an
            earlier ``calibrate`` recorded in ``gate.json``, else the run's own), which the
            held-out images of later fits are read from.
        supervised_: The supervised model (:class:`~hybridcls.supervised.SupervisedModel`).
        tower_: The CLIP tower (:class:`~hybridcls.zeroshot.ClipTower`).
        engine_: The :class:`~hybridcls.engine.InferenceEngine` running both towers.
        gate_: The fitted :class:`~hybridcls.gate.Gate`, or ``None`` before :meth:`calibrate`.
        gate_error_: Why ``gate_`` cannot be used with the towers loaded: a
            :class:`~hybridcls.errors.ParameterError` naming ``clip_model`` or
            ``clip_pretrained`` and the CLIP the gate was calibrated with, or a
            :class:`~hybridcls.errors.CheckpointError` when the run's supervised weights are
            not those it was calibrated on (resumed or trained again since), or when its
            ``gate.json`` records another number of seen classes (it belongs to another run;
            ``gate_`` is then None). Raised by every use of the gate until :meth:`calibrate`;
            None when the gate is the towers' own.
        support_samples_: The support images joined (``(path, class index)``), or empty.
        device_: The torch device used.

    Example:
        >>> from hybridcls import HybridClassifier
        >>> clf = HybridClassifier(prompts="prompts/animals.txt")  # doctest: +SKIP
        >>> clf.fit("data/train", output="runs/seen40").calibrate()  # doctest: +SKIP
        >>> clf.predict(["data/test/"])  # doctest: +SKIP
        array(['zebra', 'moose', ...], dtype=object)
    """

    EXTRA_COLUMNS = BRANCH_COLUMNS
    LOAD_PARAMETERS = (*Predictor.LOAD_PARAMETERS, "model", "train_options")
    LOAD_METHOD = "load_run() or fit()"

    def __init__(
        self,
        model: str = "convnext_tiny",
        clip_model: str | None = None,
        clip_pretrained: str | None = DEFAULT_CLIP_PRETRAINED,
        prompts: Any = None,
        templates: Any = None,
        *,
        method: str = "leave-classes-out",
        score: str = "clip_margin",
        tpr: float = 0.95,
        rounds: int = 5,
        seed: int = 0,
        cache_branch: str = "auto",
        mode: str | None = None,
        unseen_only: bool | None = None,
        unknown_threshold: float | None = None,
        cascade: bool = False,
        rollup_threshold: float | None = None,
        rollup_precision: float | None = None,
        truncate_prompts: bool = False,
        allowed_classes: Sequence[str] | None = None,
        site_classes: Any = None,
        support: Any = None,
        train_options: dict[str, Any] | None = None,
        device: str = _R.device,
        batch_size: int = _R.batch_size,
        workers: int = _R.workers,
        precision: str = _R.precision,
        compile: bool = _R.compile,
        decode: str = _R.decode,
        draft: bool = _R.draft,
        cache_dir: str | os.PathLike[str] | None = _R.cache_dir,
        progress: bool = _R.progress,
    ) -> None:
        self.model = model
        self.clip_model = clip_model
        self.clip_pretrained = clip_pretrained
        self.prompts = prompts
        self.templates = templates
        self.method = method
        self.score = score
        self.tpr = tpr
        self.rounds = rounds
        self.seed = seed
        self.cache_branch = cache_branch
        self.mode = mode
        self.unseen_only = unseen_only
        self.unknown_threshold = unknown_threshold
        self.cascade = cascade
        self.rollup_threshold = rollup_threshold
        self.rollup_precision = rollup_precision
        self.truncate_prompts = truncate_prompts
        self.allowed_classes = allowed_classes
        self.site_classes = site_classes
        self.support = support
        self.train_options = train_options
        self.device = device
        self.batch_size = batch_size
        self.workers = workers
        self.precision = precision
        self.compile = compile
        self.decode = decode
        self.draft = draft
        self.cache_dir = cache_dir
        self.progress = progress

    # ------------------------------------------------------------------ building

    def fit(self, train_dir: str | os.PathLike[str], prompts: Any = None, *,
            output: str | os.PathLike[str], **train_overrides: Any) -> HybridClassifier:
        """Train the supervised branch on ``train_dir`` and load both branches.

        Args:
            train_dir: ImageFolder-style folder of the seen classes.
            prompts: Overrides the ``prompts`` given at construction.
            output: The run directory to create.
            **train_overrides: Options for :func:`hybridcls.train.train` (``epochs=3``...).

        Returns:
            ``self`` (uncalibrated: call :meth:`calibrate` next).
        """
        settings = RuntimeSettings.of(self)
        options = {"model": self.model, "device": settings.device, "workers": settings.workers,
                   "progress": settings.progress, **(self.train_options or {}), **train_overrides}
        result = train(train_dir, output, **options)
        return self.load_run(result.run_dir, prompts)

    def load_run(self, run_dir: str | os.PathLike[str], prompts: Any = None) -> HybridClassifier:
        """Load a trained run directory (and its gate, when calibrated) with the CLIP tower.

        The CLIP is the one the gate was calibrated with unless ``clip_model`` names one
        (:func:`hybridcls.zeroshot.gate_clip.clip_to_load`); a gate whose ``gate.json`` does not record
        its CLIP (written before hybridcls recorded it) loads with a warning that it cannot
        be checked.

        Raises:
            ParameterError: No prompts, or a runtime setting this machine cannot honour.
            PromptFileError: A training class that matches no line of the prompts file.
            CheckpointError: A missing or corrupt checkpoint or gate.
        """
        return self._load(Path(run_dir), prompts)

    def _load(self, run_dir: Path, prompts: Any, text_features: torch.Tensor | None = None
              ) -> HybridClassifier:
        source = prompts if prompts is not None else self.prompts
        if source is None:
            raise InputError("no prompts: pass prompts=FILE naming every class, seen and unseen")
        settings = RuntimeSettings.of(self)
        device = resolve_device(settings.device)
        model, config = load_checkpoint(run_dir, device, parameter="run_dir")
        stopped, diverged = unfinished_training(run_dir), diverged_training(run_dir)
        if diverged is not None:  # predicting is the user's choice; calibrate() refuses
            warnings.warn(f"{_diverged_weights(run_dir, diverged)}; resuming it would diverge "
                          f"again: {diverged.new_run()}", HybridclsWarning, stacklevel=3)
        elif stopped is not None:
            warnings.warn(f"{run_dir}: its training was interrupted after {stopped}, so its weights "
                          "are those of its best epoch so far; finish it with "
                          f"train(data_dir={config.get('data_dir') or 'DIR'!r}, "
                          f"resume={os.fspath(run_dir)!r}), "
                          "then calibrate it again (the gate holds for the weights it was set on)",
                          HybridclsWarning, stacklevel=3)
        seen = [str(c) for c in config["classes"]]
        prompt_set = align_classes(seen, as_prompt_set(source))
        record = recorded_clip(run_dir)
        gate_file = run_dir / GATE_FILE
        if record is None and gate_file.is_file():  # before the CLIP loads (a download may fail)
            warnings.warn(f"{gate_file} does not record the CLIP it was calibrated with (written "
                          "before hybridcls recorded it): the CLIP cannot be checked"
                          + ("" if self.clip_model else f", and the default one is loaded "
                             f"({DEFAULT_CLIP_MODEL})") + "; calibrate again to record it",
                          HybridclsWarning, stacklevel=3)
        elif record is not None and record.get("templates") is None:
            warnings.warn(f"{gate_file} does not record the prompt templates it was calibrated with "
                          "(written before hybridcls recorded them): templates other than those "
                          "move every score unchecked; calibrate again to record them",
                          HybridclsWarning, stacklevel=3)
        clip_model, clip_pretrained = clip_to_load(self.clip_model, self.clip_pretrained, record)
        try:
            tower = ClipTower.build(clip_model, clip_pretrained, prompt_set,
                                    templates_to_load(self.templates, record),
                                    device=device, cache_dir=settings.cache_dir,
                                    truncate_prompts=self.truncate_prompts, progress=settings.progress,
                                    text_features=text_features)
        except ParameterError as err:
            given = (self.clip_model is not None
                     or (err.parameter == "clip_pretrained"
                         and self.clip_pretrained not in (None, DEFAULT_CLIP_PRETRAINED)))
            if given or record is None or err.parameter not in CLIP_PARAMETERS:
                raise  # the user's own choice is at fault, not the record
            # not a flag the user gave: the CLIP the gate recorded is what cannot be loaded here
            raise CheckpointError(
                f"{gate_file} records the CLIP it was calibrated with, {describe_clip(record)}, and "
                f"it cannot be loaded here ({err.reason}); give a copy of the same weights, e.g. "
                "clip_model='local-dir:FOLDER' (the weights' fingerprint is checked)") from None
        self._set_branches(run_dir, model, config, tower, settings)
        return self

    def _set_branches(self, run_dir: Path, model: torch.nn.Module, config: dict[str, Any],
                      tower: ClipTower, settings: RuntimeSettings) -> None:
        self.run_dir_ = run_dir
        self.supervised_ = model
        self.checkpoint_config_ = config
        self.tower_ = tower
        self.seen_folders_ = [str(c) for c in config["classes"]]
        self.n_seen_ = len(self.seen_folders_)
        self.classes_ = np.array(tower.classes, dtype=object)
        self.engine_ = InferenceEngine(supervised=model, sup_view=timm_view(config["data_config"]),
                                       clip=tower, settings=settings)
        self.device_ = self.engine_.device
        # a gate.json of another number of seen classes belongs to another run (or to this one
        # before it was trained again on other classes): not loaded (its training folder and
        # support images are not this run's), refused where a gate is used, replaced by calibrate()
        gate_file = run_dir / GATE_FILE
        other_run = n_seen_mismatch(
            gate_file, GateCalibration.from_json(gate_file).n_seen if gate_file.is_file() else None,
            self.n_seen_, of=f"{run_dir}",
            advice="calibrate it again with HybridClassifier.calibrate(), which replaces it")
        self.gate_ = None if other_run else Gate.load(
            run_dir, n_seen=self.n_seen_, clip_meta=self._index_meta("clip"),
            backbone_meta=lambda: self._index_meta("backbone"))
        self.data_dir_: str | None = None
        self.gate_error_ = other_run or self._clip_check(run_dir) or self._weights_check(run_dir)
        self.support_samples_: list[tuple[str, int]] = []
        if self.support is not None and self.gate_ is not None and self.gate_error_ is None:
            # support= is the support set: it replaces one a saved folder's gate holds
            if self.gate_.support_ is not None:
                warnings.warn(f"{support_parameter(self.support)} replaces the "
                              f"{len(self.gate_.support_.labels)} support images saved with "
                              f"{run_dir} (their embeddings cannot be added to)",
                              HybridclsWarning, stacklevel=3)
            self.add_support(self.support, replace=True)

    def _weights_check(self, run_dir: Path) -> CheckpointError | None:
        """Why the loaded gate does not hold for the run's supervised weights, or None.

        Its thresholds are on those weights' scores; the backbone index calibration wrote
        beside it records their SHA-256 (a gate without that index cannot be checked).
        """
        meta = None if self.gate_ is None else run_index_meta(run_dir, "backbone")
        if not meta or not meta.get("fingerprint"):
            return None
        calibrated, now = str(meta["fingerprint"]), self._supervised_identity()["fingerprint"]
        if calibrated == now:
            return None
        return CheckpointError(f"{run_dir / GATE_FILE}: calibrated on other weights of this run "
                               f"({calibrated[:12]}...; model.safetensors is now {now[:12]}...: "
                               "resumed or trained again since), so its thresholds do not hold; "
                               "calibrate it again with HybridClassifier.calibrate()")

    def _clip_check(self, run_dir: Path) -> ParameterError | None:
        """Why the loaded gate cannot be used with the loaded CLIP (:func:`clip_mismatch`), or None."""
        if self.gate_ is None or self.gate_.calibration_ is None:
            return None
        record = self.gate_.calibration_.clip
        if record is None:  # warned at load (_load)
            return None
        bundle = self.tower_.bundle
        return (clip_mismatch(record, bundle.identity(), clip_model=self.clip_model,
                              clip_pretrained=bundle.pretrained, gate_file=run_dir / GATE_FILE)
                or templates_mismatch(record, self.tower_.templates, templates=self.templates,
                                      gate_file=run_dir / GATE_FILE))

    def _index_meta(self, embedding: str) -> dict[str, Any]:
        """The provenance this run's ``embedding`` index carries (see :func:`hybridcls.index.index_meta`)."""
        if embedding == "clip":
            bundle = self.tower_.bundle
            meta = index_meta("clip", bundle.model_id, bundle.fingerprint, self.seen_folders_)
            if bundle.fingerprint:
                # the weights' hash identifies the model; its id may spell a moved local-dir: path
                meta.pop("model_id")
            return meta
        tower = self._supervised_identity()
        return index_meta("backbone", tower["model_id"], tower["fingerprint"], self.seen_folders_)

    def _supervised_identity(self) -> dict[str, Any]:
        """The supervised tower's timm name and weights' SHA-256 (:func:`checkpoint_identity`)."""
        return checkpoint_identity(self.run_dir_, self.checkpoint_config_, cache_dir=self.cache_dir)

    # ------------------------------------------------------------------ calibration

    def calibrate(self, data_dir: str | os.PathLike[str] | None = None, *, test_inputs: Any = None,
                  save: bool = True) -> HybridClassifier:
        """Fit the gate with no unseen images (``method``, ``tpr``, ``score``, ``rounds``, ``seed``,
        ``cache_branch``), and save it in the run directory.

        The gate records the CLIP loaded (``gate.json``'s ``clip``): a run loaded with another
        CLIP than its old gate's is calibrated anew here, and its later loads use this one.

        Runs both towers over the run's training images and its held-out seen images (the
        split recorded by ``train``), then :meth:`hybridcls.gate.Gate.fit`.

        Args:
            data_dir: The training folder (default: the one the run was trained on).
            test_inputs: Unlabelled test images: refit the threshold on their own score
                distribution (transductive, a two-component mixture; at least 4 images).
            save: Write ``gate.json`` and ``index/`` (the training images' CLIP embeddings and
                backbone features, with their labels and paths) into the run directory.

        Returns:
            ``self`` with ``gate_`` set. Settings that depend on the data's size adapt to it
            and say so in ``gate_.calibration_.adapted`` (docs/gate.md, "Small data").

        Raises:
            ParameterError: A calibration parameter out of its range (names it).
            DataTooSmallError: The data cannot support the method; the message says what to do.
            CheckpointError: The run's training diverged (:func:`check_not_diverged`).
        """
        check_is_fitted(self, "engine_")
        check_not_diverged(self.run_dir_)
        gate = Gate(method=self.method, score=self.score, tpr=self.tpr, rounds=self.rounds,
                    seed=self.seed, cache_branch=self.cache_branch)
        gate.check_params()  # before the towers' long passes
        test = None if test_inputs is None else as_sources(test_inputs, parameter="test_inputs")
        if (self.gate_ is not None and self.gate_.support_ is not None and not self.support_samples_
                and self.support is None):
            warnings.warn("the support images that came with this classifier's saved folder are "
                          "kept as embeddings only and cannot join a new calibration: add them "
                          "again (add_support) after it", HybridclsWarning, stacklevel=2)
        data = self._training_data(data_dir)
        read = self._training_folder(data_dir)  # the folder data came from
        if data_dir is not None:  # the support fit below and later ones read its held-out images
            self.data_dir_ = os.path.abspath(data_dir)
        train_out, y_tr, tr_paths = self._labelled_outputs(data.train, "calibrate: train")
        val_out, y_va, _ = self._labelled_outputs(data.val, "calibrate: held-out")
        test_out = None
        if test is not None:
            test_out, _ = self._readable_outputs(test, "calibrate: test")
        gate.fit(train_out, y_tr, val_out, y_va, class_names=self.seen_folders_,
                 # the index's paths absolute: explain reads them from wherever it runs
                 train_paths=[os.path.abspath(p) for p in tr_paths], test=test_out,
                 clip_logit_scale=self.tower_.logit_scale,
                 index_meta={"clip": self._index_meta("clip"), "backbone": self._index_meta("backbone")},
                 clip={**self.tower_.bundle.identity(), "templates": list(self.tower_.templates)})
        own = self.checkpoint_config_.get("data_dir")
        if read is not None and (own is None or os.path.abspath(read) != os.path.abspath(own)):
            # not the run's own (it moved): recorded, so that a later load reads the same folder
            gate.calibration_ = gate.calibration_.replace(data_dir=os.path.abspath(read))
        self.gate_, self.gate_error_ = gate, None
        if save:
            gate.save(self.run_dir_)
        if self.support is not None and not self.support_samples_:
            self.add_support(self.support)
        else:  # support images stay joined (the run directory keeps the gate without them)
            refit_support(self)
        return self

    def calibrate_rollup(self, precision: float | None = None,
                         data_dir: str | os.PathLike[str] | None = None) -> RollupCalibration:
        """Choose the roll-up threshold at a target precision on the run's held-out seen images.

        The images are those :meth:`calibrate` sets the gate on (none trained the supervised
        branch); their fused probabilities, with the prediction-time gate options, go to
        :func:`hybridcls.hierarchy.calibrate_threshold`. The result is kept in
        ``rollup_calibration_`` and reused while the precision and the gate options stay.

        Args:
            precision: The target (default: the ``rollup_precision`` parameter).
            data_dir: The training folder (default: the one the run was trained on).

        Raises:
            ParameterError: No precision, or none that a threshold reaches (names it).
            DataTooSmallError: No held-out image.
        """
        precision = self.rollup_precision if precision is None else precision
        if precision is None:
            raise ParameterError("rollup_precision", None, "give the target precision")
        gate = self._prediction_gate()
        key = (float(precision), id(self.gate_), self.mode, self.unseen_only, self.unknown_threshold,
               data_dir)
        kept = getattr(self, "rollup_calibration_", None)
        if kept is not None and getattr(self, "_rollup_key", None) == key:
            return kept
        with self.engine_.uncounted():  # the count is of the images predicted, not these
            val, y = self.held_out_outputs(data_dir)
        self.rollup_calibration_ = calibrate_threshold(gate.predict(val).probs, y, self.hierarchy_,
                                                       float(precision))
        self._rollup_key = key
        return self.rollup_calibration_

    def _rollup_calibration(self, precision: float) -> RollupCalibration:
        return self.calibrate_rollup(precision)

    def held_out_outputs(self, data_dir: str | os.PathLike[str] | None = None
                         ) -> tuple[BranchOutputs, np.ndarray]:
        """Both towers' outputs on the run's held-out seen images, and their seen-class indices.

        The images :meth:`calibrate` sets thresholds on (the split ``train`` recorded); for
        benchmarks that compare gates on them (:meth:`hybridcls.gate.Gate.candidate`).
        """
        check_is_fitted(self, "engine_")
        val, y, _ = self._labelled_outputs(self._training_data(data_dir).val, "held-out")
        return val, y

    def _training_folder(self, data_dir: str | os.PathLike[str] | None = None) -> str | None:
        """The training folder held-out images are read from: ``data_dir``, else the one given
        to :meth:`calibrate`, else the first that is here of the one an earlier ``calibrate``
        recorded in ``gate.json`` (the run's had moved) and the one the run records; neither
        here: the first of them, for the message (``None``: none recorded)."""
        check_is_fitted(self, "engine_")
        if data_dir or self.data_dir_:
            return os.fspath(data_dir or self.data_dir_)
        recorded = self._recorded_training_folders()
        return next((f for f in recorded if Path(f).is_dir()), recorded[0] if recorded else None)

    def _recorded_training_folders(self) -> list[str]:
        """The training folders recorded, in the order they are read: the one an earlier
        ``calibrate`` recorded in ``gate.json``, then the run's own."""
        cal = None if self.gate_ is None else self.gate_.calibration_
        return _recorded_folders(None if cal is None else cal.data_dir, self.checkpoint_config_.get("data_dir"))

    def _training_data(self, data_dir: str | os.PathLike[str] | None) -> Any:
        settings = RuntimeSettings.of(self)
        given = data_dir or self.data_dir_  # named as data_dir= in errors; the run's record is not
        data_dir = self._training_folder(data_dir)
        if data_dir is None or (not given and not Path(data_dir).is_dir()):
            raise _no_training_folder(self.run_dir_, self._recorded_training_folders())
        config = TrainConfig.from_dict(self.checkpoint_config_.get("train", {})).replace(
            workers=settings.workers, progress=settings.progress)
        split = self.checkpoint_config_.get("split") or {}
        if split.get("method") == "val_dir":  # the record's folder: absolute since runs record it so
            config = config.replace(val_dir=split["val_dir"])
        return resolve_training_data(data_dir, config, previous_check=recorded_image_check(self.run_dir_),
                                     recorded_split=self.checkpoint_config_.get("split"),
                                     parameter="data_dir" if given else None, classes=self.seen_folders_)

    def _labelled_outputs(self, samples: list[tuple[str, int]], desc: str
                          ) -> tuple[BranchOutputs, np.ndarray, list[str]]:
        """Both towers' outputs of ``(path, label)`` samples; the undecodable ones left out."""
        outputs, errors = self._readable_outputs([Source(p) for p, _ in samples], desc)
        kept = [(p, y) for i, (p, y) in enumerate(samples) if i not in errors]
        return outputs, np.array([y for _, y in kept], dtype=np.int64), [str(p) for p, _ in kept]

    def _readable_outputs(self, sources: Sequence[Source], desc: str
                          ) -> tuple[BranchOutputs, dict[int, str]]:
        """Both towers' outputs of the images that decode, and ``{position: reason}`` of the others.

        A threshold or a support fit is still set on the rest, so an unreadable image is left
        out, but named in a :class:`~hybridcls.errors.HybridclsWarning` (and none readable is an
        error).
        """
        if not sources:
            raise InputError(f"{desc}: no image to read")
        outputs, errors = self.engine_.extract(sources, desc=desc)
        if outputs is None:
            raise InputError(f"{desc}: none of the {len(sources)} images could be decoded: "
                             + "{}: {}".format(*describe_failures(sources, errors)))
        if errors:
            path, reason = describe_failures(sources, errors)
            warnings.warn(f"{desc}: {len(errors)} of {len(sources)} images could not be read and are "
                          f"left out: {path}: {reason}", HybridclsWarning, stacklevel=3)
        return outputs, errors

    # ------------------------------------------------------------------ inference

    def _prediction_gate(self) -> Gate:
        check_is_fitted(self, "engine_")
        if self.gate_error_ is not None:  # before gate_: one of another run is not loaded
            raise self.gate_error_
        if self.gate_ is None:
            raise _uncalibrated(self.run_dir_)
        gate = self.gate_.with_options(mode=self.mode, unseen_only=self.unseen_only,
                                       unknown_threshold=self.unknown_threshold)
        gate.check_ready()
        return gate

    def _clip_policy(self, gate: Gate) -> ClipPolicy:
        return gate.clip_policy(cascade=self.cascade)

    def seen_logits(self, features: BranchOutputs) -> np.ndarray:
        """The seen-class logits the gate and the fusion read: supervised, plus the cache branch when on.

        Example:
            >>> feats = clf.extract_features(["val/"])  # doctest: +SKIP
            >>> clf.seen_logits(feats).argmax(axis=1)  # doctest: +SKIP
        """
        return self._prediction_gate().seen_logits(features)

    def cascade_skips_clip(self, features: BranchOutputs) -> np.ndarray:
        """``[N]`` True where the cascade (``cascade=True``) decides without running CLIP.

        Example:
            >>> feats = clf.extract_features(["test/"])  # doctest: +SKIP
            >>> f"CLIP on {100 * (1 - clf.cascade_skips_clip(feats).mean()):.0f}% of images"  # doctest: +SKIP
        """
        return self._prediction_gate().cascade_keep(features)

    # ------------------------------------------------------------------ persistence

    def save_pretrained(self, directory: str | os.PathLike[str], *, repo_id: str | None = None) -> Path:
        """Write a self-contained folder (:mod:`hybridcls.pretrained`): checkpoint (its
        ``config.json`` readable by timm too), gate, indexes, prompts, templates, class-text
        matrix, and the model card ``README.md``.

        ``from_pretrained`` on it needs no prompts file; the saved class-text matrix replaces
        the one built at load (a warm text cache makes that build free). Support images
        joined (:meth:`add_support`) are saved as their embeddings (``support.safetensors``)
        with the gate they set.

        Args:
            directory: The folder to write.
            repo_id: The Hub repo the folder is for (the card's example loads it).
        """
        check_is_fitted(self, "engine_")
        if self.gate_error_ is not None:
            raise self.gate_error_
        bundle = self.tower_.bundle
        folder = write_saved_folder(
            directory, run_dir=self.run_dir_, prompts=self.tower_.prompts,
            templates=self.tower_.templates, text_features=self.tower_.text_features.cpu().numpy(),
            # the CLIP loaded, as loaded: no pretrained tag with a model whose weights come with it
            meta={"clip_model": bundle.model_id, "clip_pretrained": bundle.pretrained,
                  "clip_fingerprint": bundle.fingerprint,
                  "classes": [str(c) for c in self.classes_], "n_seen": self.n_seen_,
                  "model_version": self.model_version_},
            gate=None if self.gate_ is None else self.gate_.summary(), repo_id=repo_id)
        if self.gate_ is not None:
            # the gate in use replaces the run directory's copy: support images joined (their
            # cache and the threshold they set) live only here, and a calibrate(save=False)
            # left the run directory's gate.json behind
            (folder / SUPPORT_FILE).unlink(missing_ok=True)
            self.gate_.save(folder)
        return folder

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
                    revision: str | None = None, commit_message: str = "Upload hybridcls classifier",
                    create_pr: bool = False) -> Any:
        """Save the classifier (:meth:`save_pretrained`, model card included) into a temporary
        folder and upload it to the Hugging Face Hub repo ``repo_id`` as one commit.

        Args:
            repo_id: ``ORG/NAME``; created when it does not exist.
            private: Create the repo private (an existing repo keeps its visibility).
            token: A Hub token with write access (default: huggingface_hub's login).
            revision: The branch to commit to (default: ``main``).
            commit_message: The commit's message.
            create_pr: Open a pull request instead of committing to the branch.

        Returns:
            huggingface_hub's ``CommitInfo``.

        Example:
            >>> clf.push_to_hub("my-org/awa2-hybrid")  # doctest: +SKIP
            >>> HybridClassifier.from_pretrained("my-org/awa2-hybrid")  # doctest: +SKIP
        """
        check_is_fitted(self, "engine_")
        with tempfile.TemporaryDirectory(prefix="hybridcls-push-") as tmp:
            folder = self.save_pretrained(Path(tmp) / "model", repo_id=repo_id)
            return upload_folder(folder, repo_id, private=private, token=token, revision=revision,
                                 commit_message=commit_message, create_pr=create_pr)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike[str], *, revision: str | None = None,
                        local_files_only: bool = False, token: str | bool | None = None,
                        **params: Any) -> HybridClassifier:
        """Load a folder written by :meth:`save_pretrained`, or a Hugging Face Hub repo of one.

        Args:
            name_or_path: The folder, or a Hub repo id (``ORG/NAME``; ``hf-hub:ORG/NAME`` too),
                fetched into the Hugging Face cache (``cache_dir`` when given, as for the CLIP
                weights) by ``huggingface_hub.snapshot_download``: nothing is downloaded when
                ``HF_HUB_OFFLINE`` is set or ``local_files_only`` is true.
            revision: The repo's branch, tag or commit (default: ``main``).
            local_files_only: Use the Hugging Face cache only.
            token: A Hub token for a private repo.
            **params: Estimator parameters that override the saved ones (``device``,
                ``clip_pretrained`` for CLIP weights kept elsewhere on this machine...).

        Raises:
            ParameterError: ``clip_model``, ``prompts``, ``templates`` or
                ``truncate_prompts=True``, which the folder fixes (its class-text matrix is
                saved, the class texts cut or not when it was built).
            CheckpointError: Not such a folder, or one whose files disagree.
            WeightsUnavailableError: A repo that is not in the cache and cannot be downloaded
                (offline), named with the cache it was looked for in.

        Example:
            >>> clf = HybridClassifier.from_pretrained("my-org/awa2-hybrid", device="cuda")  # doctest: +SKIP
        """
        fixed = [name for name in ("clip_model", "prompts", "templates") if name in params]
        fixed += ["truncate_prompts"] if params.get("truncate_prompts") else []
        if fixed:
            # load_run(...) reads, on predict's and explain's command line, as their flags
            raise ParameterError(fixed[0], params[fixed[0]], "a saved folder fixes its CLIP model, "
                                 "prompts and templates (its class-text matrix is built from them); "
                                 "to change them, load the run directory it was saved from with "
                                 "load_run(run_dir=RUN_DIR, prompts=FILE)")
        directory = pretrained_folder(name_or_path, revision=revision, cache_dir=params.get("cache_dir"),
                                      local_files_only=local_files_only, token=token)
        meta, stored = read_saved_folder(directory)  # its files checked against each other
        chosen = "clip_pretrained" in params
        params = {"clip_pretrained": meta["clip_pretrained"], **params}  # weights may be elsewhere here
        # the folder's own files, which no message may call the user's templates= or prompts=
        clf = cls(clip_model=meta["clip_model"], prompts=str(directory / PROMPTS_FILE),
                  templates=str(directory / TEMPLATES_FILE), **params)
        clf._load(directory, None, text_features=torch.from_numpy(stored))
        if list(clf.classes_) != meta["classes"]:
            raise CheckpointError(f"{directory}: the classes it records differ from its prompts; "
                                  f"{RESAVE}")
        saved_fp, loaded_fp = meta.get("clip_fingerprint"), clf.tower_.bundle.fingerprint
        if saved_fp and loaded_fp and saved_fp != loaded_fp:
            # its class-text matrix, support cache and threshold belong to the saved weights;
            # the parameter is named only when the user gave it
            loads = (f"clip_pretrained={params['clip_pretrained']!r} loads" if chosen
                     else f"the CLIP its {HYBRID_FILE} names loads")
            raise CheckpointError(f"{directory}: saved with CLIP weights {saved_fp[:12]}..., "
                                  f"{loads} {loaded_fp[:12]}... here: give the weights it was "
                                  "saved with" + ("" if chosen else ", as clip_pretrained=FILE"))
        return clf
