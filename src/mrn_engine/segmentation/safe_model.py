"""nnU-Net models without pickles: safetensors weights + JSON metadata, hash-verified.

A bundle's ``nnunet/<MOD>/`` folder holds ``plans.json``, ``dataset.json``, ``mrn_nnunet.json``
(provenance with the sha256 of every model file) and per fold ``fold_k/model.safetensors``
(network weights) plus ``fold_k/model.json`` (trainer name, configuration, mirroring axes).
Loading verifies every hash first, reads the weights with ``safetensors`` (no code can run),
checks that ``plans.json`` only names network classes of ``dynamic_network_architectures`` and
building blocks of ``torch.nn``, and initialises nnU-Net's ``nnUNetPredictor`` through
``manual_initialization``.

Legacy folders that hold only nnU-Net's pickled ``checkpoint_final.pth`` are read with
``torch.load(weights_only=True)`` and an explicit allow-list (numpy scalars and dtypes); a
checkpoint that needs anything else is refused unless the user opts in with
``--trust-pickled-nnunet`` or ``MRN_TRUST_PICKLED_NNUNET=1`` (full unpickling: only for files
whose origin you trust).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

from mrn_engine.errors import MRNWarning, WeightsError
from mrn_engine.fileio import umask_mode
from mrn_engine.runtime import check_finite_state, file_sha256

SAFE_WEIGHTS = "model.safetensors"
SAFE_META = "model.json"
PICKLED_CHECKPOINT = "checkpoint_final.pth"
PROVENANCE_FILE = "mrn_nnunet.json"
#: environment variable of the opt-in for full unpickling of legacy nnU-Net checkpoints
TRUST_ENV = "MRN_TRUST_PICKLED_NNUNET"
TRUST_FLAG = "--trust-pickled-nnunet"
#: the only modules plans.json may name as network class / imported building block
ALLOWED_ARCH_PREFIX = "dynamic_network_architectures.architectures."
ALLOWED_IMPORT_PREFIX = "torch.nn."
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")


def trust_pickled_default() -> bool:
    """True when ``MRN_TRUST_PICKLED_NNUNET`` is set to 1/true/yes."""
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes")


def recorded_hashes(model_dir: Path) -> dict[str, str]:
    """``relative path -> sha256`` from ``mrn_nnunet.json`` (error when absent or malformed)."""
    prov = model_dir / PROVENANCE_FILE
    if not prov.is_file():
        raise WeightsError(
            f"{prov}: missing; the nnU-Net model files cannot be verified (convert the model "
            "with `mrn seg convert`)"
        )
    try:
        data = json.loads(prov.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{prov}: unreadable provenance file ({e})") from e
    sums = data.get("sha256") if isinstance(data, dict) else None
    if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
        raise WeightsError(f"{prov}: no 'sha256' mapping of file -> hash")
    return sums


def verify_hashes(model_dir: Path, rel_paths: list[str], optional: tuple[str, ...] = ()) -> None:
    """Raise unless every file's sha256 matches the one recorded in ``mrn_nnunet.json``.

    Files in ``optional`` are checked only when a hash is recorded for them (older bundles
    recorded only the checkpoints).
    """
    sums = recorded_hashes(model_dir)
    for rel in [*rel_paths, *(o for o in optional if o in sums)]:
        path = model_dir / rel
        if rel not in sums:
            raise WeightsError(f"{path}: no sha256 recorded in {model_dir / PROVENANCE_FILE}")
        if not path.is_file():
            raise WeightsError(f"{path}: file not found")
        actual = file_sha256(path)
        if actual != sums[rel]:
            raise WeightsError(
                f"{path}: sha256 {actual[:16]}... does not match the recorded {sums[rel][:16]}... "
                f"in {model_dir / PROVENANCE_FILE} (file modified or corrupt); refusing to load"
            )


def check_plans_safe(plans: Any, path: Path) -> None:
    """Refuse plans that would make nnU-Net import anything but known network code."""
    if not isinstance(plans, dict) or not isinstance(plans.get("configurations"), dict):
        raise WeightsError(f"{path}: not an nnU-Net plans file (no 'configurations' mapping)")
    for name, conf in plans["configurations"].items():
        if not isinstance(conf, dict):
            raise WeightsError(f"{path}: configuration {name!r} is not a mapping")
        arch = conf.get("architecture")
        if arch is None:
            continue
        if not isinstance(arch, dict):
            raise WeightsError(f"{path}: configuration {name!r}: 'architecture' is not a mapping")
        cls = arch.get("network_class_name")
        if not isinstance(cls, str) or not (
            cls.startswith(ALLOWED_ARCH_PREFIX) and _DOTTED.match(cls)
        ):
            raise WeightsError(
                f"{path}: configuration {name!r}: network class {cls!r} is not one of "
                f"{ALLOWED_ARCH_PREFIX}*; refusing to import it"
            )
        kwargs = arch.get("arch_kwargs", {})
        for key in arch.get("_kw_requires_import", []) or []:
            value = kwargs.get(key) if isinstance(kwargs, dict) else None
            if value is not None and not (
                isinstance(value, str)
                and value.startswith(ALLOWED_IMPORT_PREFIX)
                and _DOTTED.match(value)
            ):
                raise WeightsError(
                    f"{path}: configuration {name!r}: {key} = {value!r} is not a "
                    f"{ALLOWED_IMPORT_PREFIX}* class; refusing to import it"
                )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: unreadable JSON ({e})") from e


def _safe_globals() -> list:
    import numpy as np

    return [
        (np._core if hasattr(np, "_core") else np.core).multiarray.scalar,
        np.dtype,
        *(type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")),
    ]


def read_pickled_checkpoint(path: Path, *, trust_pickled: bool = False) -> dict:
    """nnU-Net ``checkpoint_final.pth`` read without running code (unless ``trust_pickled``)."""
    import torch

    if trust_pickled:
        warnings.warn(
            f"{path}: unpickling a checkpoint with full trust ({TRUST_FLAG}); this can run code "
            "stored in the file",
            MRNWarning,
            stacklevel=2,
        )
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - any reader failure is a bad file
            raise WeightsError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from e
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - refusal or corrupt file
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise WeightsError(
            f"{path}: refused to load this pickled nnU-Net checkpoint safely ({first}). It "
            f"needs objects outside the allow-list of plain tensors and numbers, and unpickling "
            f"it could run code stored in the file. Only if you trust where it comes from, pass "
            f"{TRUST_FLAG} (or set {TRUST_ENV}=1) and convert it with `mrn seg convert`"
        ) from e
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("network_weights"), dict):
        raise WeightsError(f"{path}: not an nnU-Net checkpoint (no 'network_weights')")
    return ckpt


def checkpoint_meta(ckpt: dict, path: Path) -> dict:
    """Trainer name, configuration and mirroring axes of a checkpoint, validated."""
    try:
        meta = {
            "trainer_name": ckpt["trainer_name"],
            "configuration": ckpt["init_args"]["configuration"],
            "inference_allowed_mirroring_axes": ckpt.get("inference_allowed_mirroring_axes"),
        }
    except (KeyError, TypeError) as e:
        raise WeightsError(f"{path}: nnU-Net checkpoint lacks {e}") from e
    return validate_meta(meta, path)


def validate_meta(meta: Any, path: Path) -> dict:
    """Check a fold's ``model.json`` content (types and names)."""
    if not isinstance(meta, dict):
        raise WeightsError(f"{path}: expected a JSON object")
    trainer = meta.get("trainer_name")
    conf = meta.get("configuration")
    axes = meta.get("inference_allowed_mirroring_axes")
    if not isinstance(trainer, str) or not _NAME.match(trainer):
        raise WeightsError(f"{path}: trainer_name {trainer!r} is not a class name")
    if not isinstance(conf, str) or not conf:
        raise WeightsError(f"{path}: configuration {conf!r} is not a name")
    if axes is not None:
        if not isinstance(axes, (list, tuple)) or not all(
            isinstance(a, int) and 0 <= a < 3 for a in axes
        ):
            raise WeightsError(f"{path}: inference_allowed_mirroring_axes {axes!r} invalid")
        axes = [int(a) for a in axes]
    return {
        "trainer_name": trainer,
        "configuration": conf,
        "inference_allowed_mirroring_axes": axes,
    }


def convert_checkpoint(src: Path, fold_dir: Path, *, trust_pickled: bool = False) -> list[str]:
    """Write ``fold_dir/model.safetensors`` + ``model.json`` from a pickled checkpoint.

    Returns the names written (relative to ``fold_dir``).
    """
    from safetensors.torch import save_file

    ckpt = read_pickled_checkpoint(src, trust_pickled=trust_pickled)
    meta = checkpoint_meta(ckpt, src)
    # clone: nnU-Net decoders share tensors with the encoder, safetensors stores each key once
    state = {k: v.detach().cpu().clone().contiguous() for k, v in ckpt["network_weights"].items()}
    check_finite_state(state, src)
    fold_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(fold_dir / SAFE_WEIGHTS))
    umask_mode(fold_dir / SAFE_WEIGHTS)  # safetensors writes 0600
    (fold_dir / SAFE_META).write_text(json.dumps(meta, indent=2))
    return [SAFE_WEIGHTS, SAFE_META]


def load_fold(
    model_dir: Path, fold: int | str, *, trust_pickled: bool = False
) -> tuple[dict, dict]:
    """``(state_dict, meta)`` of one fold: safetensors if present, else the legacy pickle."""
    fold_dir = model_dir / f"fold_{fold}"
    if (fold_dir / SAFE_WEIGHTS).is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(fold_dir / SAFE_WEIGHTS), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{fold_dir / SAFE_WEIGHTS}: unreadable ({e})") from e
        check_finite_state(state, fold_dir / SAFE_WEIGHTS)
        meta = validate_meta(_read_json(fold_dir / SAFE_META), fold_dir / SAFE_META)
        return state, meta
    ckpt_path = fold_dir / PICKLED_CHECKPOINT
    if not ckpt_path.is_file():
        raise WeightsError(f"{fold_dir}: neither {SAFE_WEIGHTS} nor {PICKLED_CHECKPOINT} found")
    ckpt = read_pickled_checkpoint(ckpt_path, trust_pickled=trust_pickled)
    return ckpt["network_weights"], checkpoint_meta(ckpt, ckpt_path)


def fold_files(model_dir: Path, fold: int | str) -> list[str]:
    """Files of a fold that loading reads (relative to ``model_dir``)."""
    if (model_dir / f"fold_{fold}" / SAFE_WEIGHTS).is_file():
        return [f"fold_{fold}/{SAFE_WEIGHTS}", f"fold_{fold}/{SAFE_META}"]
    return [f"fold_{fold}/{PICKLED_CHECKPOINT}"]


def build_network(plans: dict, dataset_json: dict, meta: dict, where: Path) -> tuple:
    """``(network, plans_manager, configuration_manager)`` from checked plans and fold metadata.

    ``plans`` must have passed :func:`check_plans_safe`; ``where`` names the model in errors.
    """
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    try:
        pm = PlansManager(plans)
        cm = pm.get_configuration(meta["configuration"])
        n_in = determine_num_input_channels(pm, cm, dataset_json)
        if meta["trainer_name"] == "nnUNetTrainer":  # no search through nnU-Net's modules
            from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

            trainer_class = nnUNetTrainer
        else:
            trainer_class = recursive_find_trainer_class_by_name(meta["trainer_name"])
        n_out = pm.get_label_manager(dataset_json).num_segmentation_heads
        network = trainer_class.build_network_architecture(
            pm, cm, n_in, n_out, enable_deep_supervision=False
        )
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise WeightsError(f"{where}: cannot build the nnU-Net network ({e})") from e
    return network, pm, cm


def initialize_predictor(
    predictor: Any, model_dir: Path, folds: list[int | str], *, trust_pickled: bool = False
) -> None:
    """Load a model folder into an ``nnUNetPredictor`` without unpickling code.

    Verifies the recorded sha256 of every file first (a folder without ``mrn_nnunet.json`` is
    accepted only with ``trust_pickled``), then builds the network from the checked plans.
    """
    rels = [r for f in folds for r in fold_files(model_dir, f)]
    if (model_dir / PROVENANCE_FILE).is_file() or not trust_pickled:
        verify_hashes(model_dir, rels, optional=("plans.json", "dataset.json"))
    plans = _read_json(model_dir / "plans.json")
    check_plans_safe(plans, model_dir / "plans.json")
    dataset_json = _read_json(model_dir / "dataset.json")
    params, meta = [], None
    for f in folds:
        state, m = load_fold(model_dir, f, trust_pickled=trust_pickled)
        meta = meta or m
        params.append(state)
    assert meta is not None
    network, pm, cm = build_network(plans, dataset_json, meta, model_dir)
    try:
        network.load_state_dict(params[0])
    except RuntimeError as e:
        raise WeightsError(
            f"{model_dir}: fold weights do not fit the network of plans.json ({str(e)[:300]})"
        ) from e
    axes = meta["inference_allowed_mirroring_axes"]
    predictor.manual_initialization(
        network,
        pm,
        cm,
        params,
        dataset_json,
        meta["trainer_name"],
        tuple(axes) if axes is not None else None,
    )
