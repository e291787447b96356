"""Train nnU-Net v2 NM and QSM models through nnU-Net's Python API and put them in a bundle.

Steps per modality (all inside one workspace folder, see :mod:`mrn_engine.segmentation.env`):
export the raw dataset, extract nnU-Net's fingerprint, plan (``ExperimentPlanner`` or, for CPU
smoke runs, :class:`TinyPlanner`), preprocess one configuration, then construct
``nnUNetTrainerMRN`` (our label-safe subclass) and call ``run_training()`` per fold. The trained
model folder is copied into ``BUNDLE/nnunet/{NM,QSM}/``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

from mrn_engine.bundle import NNUNET_DIR
from mrn_engine.config import atomic_write_text
from mrn_engine.errors import ConfigError, InputDataError
from mrn_engine.fileio import make_temp_dir
from mrn_engine.runtime import file_sha256, resolve_device, seed_everything
from mrn_engine.segmentation.env import nnunet_environment
from mrn_engine.segmentation.export import (
    MODALITIES,
    DatasetSpec,
    default_specs,
    export_dataset,
    exportable_cases,
)
from mrn_engine.segmentation.safe_model import (
    PICKLED_CHECKPOINT,
    PROVENANCE_FILE,
    convert_checkpoint,
)

#: trainer class name stored in checkpoints (defined in ``nnunet_ext/mrn_trainers.py``)
TRAINER_NAME = "nnUNetTrainerMRN"
PLANS_NAME = "nnUNetPlans"
#: files of a trained model folder that the bundle keeps
MODEL_FILES = ("plans.json", "dataset.json", "dataset_fingerprint.json")


@dataclass
class SegTrainConfig:
    """Options of one ``mrn seg train`` run."""

    configuration: str = "3d_fullres"
    folds: tuple[int | str, ...] = (0,)
    epochs: int | None = None  #: None = nnU-Net's 1000
    iters_per_epoch: int | None = None  #: None = nnU-Net's 250
    val_iters_per_epoch: int | None = None  #: None = max(1, iters // 5) when iters is set
    device: str = "auto"  #: auto | cpu | cuda
    tiny: bool = False  #: small network and patch (CPU smoke runs, tests)
    max_patch: tuple[int, int, int] = (16, 64, 64)  #: tiny: patch cap, nnU-Net order (Z, Y, X)
    num_processes: int = 0  #: nnU-Net worker processes; 0 = in this process (threads)
    threads: int | None = None  #: torch CPU threads during training (None = unchanged)
    seed: int = 12345  #: cross-validation split and training RNGs (python, numpy, torch)
    specs: dict[str, DatasetSpec] = field(default_factory=default_specs)


@contextlib.contextmanager
def in_process_pools() -> Iterator[None]:
    """Run nnU-Net's fingerprint/integrity/preprocessing pools as threads of this process.

    nnU-Net starts ``spawn`` process pools whose workers re-import torch and nnunetv2 (tens of
    seconds each on a small machine). For small datasets and CPU runs a thread pool with the
    same API does the same work at once. Only the module attributes are swapped, and restored.
    """
    from multiprocessing.pool import ThreadPool

    import nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor as fe
    import nnunetv2.experiment_planning.verify_dataset_integrity as vdi
    import nnunetv2.preprocessing.preprocessors.default_preprocessor as dp

    shim = SimpleNamespace(get_context=lambda *a, **k: SimpleNamespace(Pool=ThreadPool))
    saved = [(m, m.multiprocessing) for m in (fe, vdi, dp)]
    try:
        for m, _ in saved:
            m.multiprocessing = shim
        yield
    finally:
        for m, orig in saved:
            m.multiprocessing = orig


def _tiny_planner_class(max_patch: Sequence[int]):
    import numpy as np
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import (
        ExperimentPlanner,
    )

    class TinyPlanner(ExperimentPlanner):
        """nnU-Net's planner with 8 base features (max 64) and a capped patch size."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.UNet_base_num_features = 8
            self.UNet_max_features_3d = 64
            self.UNet_max_features_2d = 64

        def get_plans_for_configuration(self, spacing, median_shape, *args, **kwargs):
            cap = np.asarray(max_patch[-len(spacing) :])
            median_shape = np.minimum(np.asarray(median_shape[: len(spacing)]), cap)
            return super().get_plans_for_configuration(spacing, median_shape, *args, **kwargs)

    return TinyPlanner


def _write_splits(preprocessed_dataset: Path, case_ids: list[str], seed: int) -> None:
    """Keep ``splits_final.json`` in step with the exported cases.

    A split file left by an earlier run on other cases is removed (nnU-Net would reuse it).
    nnU-Net's own 5-fold split needs >= 5 cases: for 2-4 cases a k-fold split (k = cases) is
    written here.
    """
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    splits_file = preprocessed_dataset / "splits_final.json"
    if splits_file.exists():
        old = json.loads(splits_file.read_text())
        known = set(old[0]["train"]) | set(old[0]["val"]) if old else set()
        if known == set(case_ids):
            return
        splits_file.unlink()
    if len(case_ids) >= 5:
        return
    if len(case_ids) < 2:
        raise InputDataError(
            f"{preprocessed_dataset.name}: need at least 2 labelled cases to train, got {len(case_ids)}"
        )
    splits = generate_crossval_split(sorted(case_ids), seed=seed, n_splits=len(case_ids))
    atomic_write_text(splits_file, json.dumps(splits, indent=1))


def plan_and_preprocess(spec: DatasetSpec, cfg: SegTrainConfig, progress: bool = True) -> dict:
    """Fingerprint, plan and preprocess an exported dataset (inside :func:`nnunet_environment`).

    Returns the plans dictionary.
    """
    import torch
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import (
        ExperimentPlanner,
    )
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset,
        plan_experiment_dataset,
        preprocess_dataset,
    )

    n_proc = max(1, cfg.num_processes)
    pools = in_process_pools() if cfg.num_processes == 0 else contextlib.nullcontext()
    threads = torch.get_num_threads()
    with pools, _quiet(not progress):
        extract_fingerprint_dataset(
            spec.dataset_id,
            num_processes=n_proc,
            check_dataset_integrity=True,
            clean=True,
            verbose=False,
            show_progress_bar=progress,
        )
        planner = _tiny_planner_class(cfg.max_patch) if cfg.tiny else ExperimentPlanner
        plans, _ = plan_experiment_dataset(spec.dataset_id, planner)
        torch.set_num_threads(threads)  # the planner changes it
        if cfg.configuration not in plans["configurations"]:
            raise ConfigError(
                f"{spec.folder_name}: nnU-Net planned no {cfg.configuration!r} configuration "
                f"(available: {sorted(plans['configurations'])})"
            )
        preprocess_dataset(
            spec.dataset_id,
            PLANS_NAME,
            configurations=[cfg.configuration],
            num_processes=[n_proc],
            verbose=False,
            show_progress_bar=progress,
        )
    return plans


@contextlib.contextmanager
def _quiet(enabled: bool) -> Iterator[None]:
    """Silence nnU-Net's prints to stdout when ``enabled``."""
    if not enabled:
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield


def fold_seed(seed: int, fold: int | str) -> int:
    """The RNG seed of one nnU-Net fold's training (``fold`` may be ``"all"``).

    nnU-Net does not seed: its sampling and augmentation draw from the global RNGs (in this
    process when ``num_processes`` is 0), so a CPU run with the same seed, data and thread count
    repeats itself. With augmentation workers or on a GPU it is only statistically repeatable.
    """
    fold_offset = 0 if fold == "all" else int(fold) + 1
    return (int(seed) * 1000 + fold_offset) % (2**32)


def train_fold(
    spec: DatasetSpec, cfg: SegTrainConfig, fold: int | str, progress: bool = True
) -> Path:
    """Train one fold with ``nnUNetTrainerMRN``; returns the model folder (parent of ``fold_k``)."""
    import torch
    from nnunetv2.paths import nnUNet_preprocessed

    from mrn_engine.segmentation.nnunet_ext.mrn_trainers import nnUNetTrainerMRN

    pre = Path(os.fspath(nnUNet_preprocessed)) / spec.folder_name
    plans = json.loads((pre / f"{PLANS_NAME}.json").read_text())
    plans["continue_training"] = False
    ds_json = json.loads((pre / "dataset.json").read_text())
    device = resolve_device(cfg.device)
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        seed_everything(fold_seed(cfg.seed, fold))
        with _quiet(not progress):
            trainer = nnUNetTrainerMRN(
                plans=plans,
                configuration=cfg.configuration,
                fold=fold,
                dataset_json=ds_json,
                device=device,
            )
            if cfg.epochs is not None:
                trainer.num_epochs = int(cfg.epochs)
            if cfg.iters_per_epoch is not None:
                trainer.num_iterations_per_epoch = int(cfg.iters_per_epoch)
                trainer.num_val_iterations_per_epoch = int(
                    cfg.val_iters_per_epoch or max(1, cfg.iters_per_epoch // 5)
                )
            elif cfg.val_iters_per_epoch is not None:
                trainer.num_val_iterations_per_epoch = int(cfg.val_iters_per_epoch)
            trainer.run_training()
    finally:
        torch.set_num_threads(threads)
    return Path(trainer.output_folder_base)


def copy_model_to_bundle(
    model_dir: Path,
    bundle: str | os.PathLike,
    modality: str,
    folds: Sequence[int | str],
    provenance: dict,
    *,
    trust_pickled: bool = False,
) -> Path:
    """Put a trained nnU-Net model into ``BUNDLE/nnunet/<modality>/`` (all or nothing).

    Each fold's pickled ``checkpoint_final.pth`` is converted to ``model.safetensors`` +
    ``model.json`` (:mod:`.safe_model`); no pickle enters the bundle. The sha256 of every file
    the loader reads is recorded in ``mrn_nnunet.json``.
    """
    dest = Path(bundle) / NNUNET_DIR / modality
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(make_temp_dir(dest.parent, prefix=f".{modality}."))
    try:
        for name in MODEL_FILES:
            if not (model_dir / name).is_file():
                raise InputDataError(f"{model_dir / name}: missing (not an nnU-Net model folder)")
            shutil.copyfile(model_dir / name, tmp / name)
        checksums = {name: file_sha256(tmp / name) for name in MODEL_FILES}
        for fold in folds:
            src = model_dir / f"fold_{fold}" / PICKLED_CHECKPOINT
            if not src.is_file():
                raise InputDataError(
                    f"{src}: training of fold {fold} did not finish (no {PICKLED_CHECKPOINT})"
                )
            for name in convert_checkpoint(src, tmp / f"fold_{fold}", trust_pickled=trust_pickled):
                checksums[f"fold_{fold}/{name}"] = file_sha256(tmp / f"fold_{fold}" / name)
        provenance = {**provenance, "sha256": checksums}
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, default=str))
        old = None
        if dest.exists():
            old = dest.with_name(f".{modality}.old.{os.getpid()}")
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def parse_modalities(modality: str) -> tuple[str, ...]:
    """``nm`` / ``qsm`` / ``both`` -> modality names."""
    m = modality.lower()
    if m == "both":
        return MODALITIES
    if m in ("nm", "qsm"):
        return (m.upper(),)
    raise ConfigError(f"modality must be nm, qsm or both, not {modality!r}")


def train_segmentation(
    cases_dir: str | os.PathLike,
    workspace: str | os.PathLike,
    *,
    modality: str = "both",
    cfg: SegTrainConfig | None = None,
    bundle: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Export, plan, preprocess and train NM and/or QSM nnU-Net models.

    Parameters
    ----------
    cases_dir
        Folder of challenge cases; those with the modality's mask are used.
    workspace
        Folder that holds ``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results``.
    modality
        ``nm``, ``qsm`` or ``both``.
    bundle
        If given, the trained models are copied into ``BUNDLE/nnunet/{NM,QSM}/``.

    Returns
    -------
    dict
        Modality -> trained model folder (in the bundle when given, else in the workspace).
    """
    cfg = cfg or SegTrainConfig()
    out: dict[str, Path] = {}
    with nnunet_environment(workspace, n_proc_da=max(1, cfg.num_processes)) as paths:
        for mod in parse_modalities(modality):
            spec = cfg.specs[mod]
            cases = exportable_cases(cases_dir, mod)
            if not cases:
                raise InputDataError(
                    f"{cases_dir}: no case holds both {mod}.nii.gz and {mod}_mask.nii.gz"
                )
            export_dataset(cases, paths["nnUNet_raw"], spec, progress=progress)
            t0 = time.time()
            plan_and_preprocess(spec, cfg, progress=progress)
            _write_splits(
                paths["nnUNet_preprocessed"] / spec.folder_name,
                [c.case_id for c in cases],
                cfg.seed,
            )
            # training: augmentation in this process unless workers were asked for
            os.environ["nnUNet_n_proc_DA"] = str(cfg.num_processes)
            try:
                model_dir = None
                for fold in cfg.folds:
                    model_dir = train_fold(spec, cfg, fold, progress=progress)
            finally:
                os.environ["nnUNet_n_proc_DA"] = str(max(1, cfg.num_processes))
            assert model_dir is not None
            provenance = {
                "modality": mod,
                "dataset": spec.folder_name,
                "trainer": TRAINER_NAME,
                "configuration": cfg.configuration,
                "folds": list(cfg.folds),
                "cases": [c.case_id for c in cases],
                "train_seconds": round(time.time() - t0, 1),
                "options": {k: v for k, v in asdict(cfg).items() if k != "specs"},
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            if bundle is not None:
                out[mod] = copy_model_to_bundle(model_dir, bundle, mod, cfg.folds, provenance)
            else:
                atomic_write_text(
                    model_dir / PROVENANCE_FILE, json.dumps(provenance, indent=2, default=str)
                )
                out[mod] = model_dir
    return out
