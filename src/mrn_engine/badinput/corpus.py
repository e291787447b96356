"""The bad-input corpus: malformed cases, label files, configs and bundles, and what must happen.

Each :class:`Scenario` builds its inputs in a fresh folder and returns an :class:`Invocation`:
the ``mrn`` command to run, the exit status expected, the strings the output must contain
(the offending file and the problem), the input folders that must stay byte-identical and
the case whose outputs must not exist. :mod:`mrn_engine.badinput.runner` runs them.
"""

from __future__ import annotations

import gzip
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from mrn_engine.badinput.cases import case_affine, case_arrays, write_case, write_nifti

GOOD, BAD = "RJPD_001", "RJPD_002"


@dataclass
class Invocation:
    """One command of a scenario and its expected outcome."""

    args: list[str]
    exit_code: int
    expect: list[str]  #: substrings of the combined output (file name, problem)
    inputs: list[Path]  #: folders whose files must keep their bytes
    out: Path | None = None  #: output folder of the command (checked for leftovers)
    failed_case: str | None = None  #: case that must have no output folder
    must_not_exist: list[Path] = field(default_factory=list)  #: e.g. a crafted pickle's marker


@dataclass
class Context:
    """Where a scenario builds: its own folder and the shared read-only model bundle."""

    root: Path
    bundle: Path

    def own_bundle(self) -> Path:
        """A private copy of the bundle that the scenario may corrupt."""
        dst = self.root / "bundle"
        shutil.copytree(self.bundle, dst)
        return dst


@dataclass
class Scenario:
    name: str
    group: str
    problem: str
    build: Callable[[Context], Invocation]


def _predict(ctx: Context, cases: Path, bundle: Path, *extra: str) -> list[str]:
    out = ctx.root / "out"
    return [
        "predict",
        str(cases),
        "--model",
        str(bundle),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--quiet",
        *extra,
    ]


def _bad_case(
    write_bad: Callable[[Path], Path | None], *keywords: str, exit_code: int = 3
) -> Callable[[Context], Invocation]:
    """A cohort of one good and one broken case, run through ``mrn predict``."""

    def build(ctx: Context) -> Invocation:
        cases = ctx.root / "cases"
        write_case(cases / GOOD, seed=1)
        bad_folder = write_case(cases / BAD, seed=2)
        named = write_bad(bad_folder)
        expect = [str(named)] if named is not None else [BAD]
        return Invocation(
            _predict(ctx, cases, ctx.bundle),
            exit_code,
            [*expect, *keywords],
            [cases, ctx.bundle],
            out=ctx.root / "out",
            failed_case=BAD if exit_code == 3 else None,
        )

    return build


def _replace(stem: str, array: np.ndarray, affine: np.ndarray | None = None):
    def write(folder: Path) -> Path:
        return write_nifti(folder / f"{stem}.nii.gz", array, affine)

    return write


def _bytes(stem: str, data: bytes, name: str | None = None):
    def write(folder: Path) -> Path:
        path = folder / (name or f"{stem}.nii.gz")
        (folder / f"{stem}.nii.gz").unlink(missing_ok=True)
        path.write_bytes(data)
        return path

    return write


def _truncated(stem: str, keep: float = 0.5):
    def write(folder: Path) -> Path:
        path = folder / f"{stem}.nii.gz"
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])
        return path

    return write


def _folder_named(stem: str):
    def write(folder: Path) -> Path:
        path = folder / f"{stem}.nii.gz"
        path.unlink()
        path.mkdir()
        return path

    return write


def _missing(stem: str):
    def write(folder: Path) -> Path | None:
        (folder / f"{stem}.nii.gz").unlink()
        return None

    return write


def _singular_affine(folder: Path) -> Path:
    """sform with a zero row, qform code 0 (what some converters write)."""
    arr = case_arrays(2)["QSM"]
    img = nib.Nifti1Image(arr, case_affine())
    bad = case_affine()
    bad[1, :3] = 0.0
    img.set_sform(bad, code=1)
    img.set_qform(None, code=0)
    path = folder / "QSM.nii.gz"
    nib.save(img, str(path))
    return path


def _nan_affine(folder: Path) -> Path:
    """A header whose sform (used as the affine) holds a NaN."""
    path = folder / "NM.nii.gz"
    arr = case_arrays(2)["NM"]
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(arr.shape)
    hdr.set_data_dtype(np.float32)
    hdr.set_sform(case_affine(), 1)
    hdr.set_qform(case_affine(), 1)
    hdr["srow_x"][0] = np.nan
    hdr["vox_offset"] = 352
    with gzip.open(path, "wb") as fh:
        fh.write(hdr.binaryblock + b"\0" * 4 + arr.tobytes(order="F"))
    return path


def _huge_header(nifti2: bool, dims: int):
    def write(folder: Path) -> Path:
        path = folder / "NM.nii.gz"
        small = np.zeros((2, 2, 2), np.float32)
        img = (nib.Nifti2Image if nifti2 else nib.Nifti1Image)(small, case_affine())
        hdr = img.header
        hdr.set_data_shape((dims, dims, dims))
        with gzip.open(path, "wb") as fh:
            fh.write(hdr.binaryblock + b"\0" * (int(hdr.get_data_offset()) - len(hdr.binaryblock)))
            fh.write(small.tobytes())
        return path

    return write


def _label_csv(text: str | None, *, as_folder: bool = False):
    def build(ctx: Context) -> Invocation:
        cases = ctx.root / "cases"
        write_case(cases / GOOD, seed=1)
        write_case(cases / BAD, seed=2)
        csv = cases / "train_cases.csv"
        if as_folder:
            csv.mkdir()
        else:
            csv.write_text(text or "")
        return Invocation(["cases", str(cases), "--quiet"], 2, [str(csv)], [cases])

    return build


def _config(mutate: Callable[[dict], None], key: str):
    def build(ctx: Context) -> Invocation:
        bundle = ctx.own_bundle()
        cfg_path = bundle / "config.json"
        data = json.loads(cfg_path.read_text())
        mutate(data)
        cfg_path.write_text(json.dumps(data))
        cases = ctx.root / "cases"
        write_case(cases / GOOD, seed=1)
        return Invocation(
            _predict(ctx, cases, bundle), 2, [str(cfg_path), key], [cases, bundle], ctx.root / "out"
        )

    return build


def _setter(section: str | None, key: str, value):
    def mutate(data: dict) -> None:
        (data[section] if section else data)[key] = value

    return mutate


def _raw_config(text: str, keyword: str, folder: bool = False):
    def build(ctx: Context) -> Invocation:
        bundle = ctx.own_bundle()
        cfg_path = bundle / "config.json"
        cfg_path.unlink()
        if folder:
            cfg_path.mkdir()
        else:
            cfg_path.write_text(text)
        cases = ctx.root / "cases"
        write_case(cases / GOOD, seed=1)
        return Invocation(
            _predict(ctx, cases, bundle),
            2,
            [str(cfg_path), keyword],
            [cases, bundle],
            ctx.root / "out",
        )

    return build


def _weights(mutate: Callable[[dict], dict] | None, keyword: str, raw: bytes | None = None):
    def build(ctx: Context) -> Invocation:
        from safetensors.torch import load_file, save_file

        bundle = ctx.own_bundle()
        path = bundle / "fold_0" / "model.safetensors"
        if raw is not None:
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 3] if raw == b"truncate" else raw)
        else:
            save_file(mutate(load_file(str(path))), str(path))
        cases = ctx.root / "cases"
        write_case(cases / GOOD, seed=1)
        return Invocation(
            _predict(ctx, cases, bundle),
            2,
            [str(path), keyword],
            [cases, bundle],
            ctx.root / "out",
        )

    return build


def _poison(value: float):
    def mutate(state: dict) -> dict:
        key = sorted(k for k, v in state.items() if v.is_floating_point())[0]
        state[key] = state[key].clone().fill_(value)
        return state

    return mutate


def _reshape(state: dict) -> dict:
    import torch

    key = sorted(k for k, v in state.items() if v.ndim == 2)[0]
    state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
    return state


def _drop_key(state: dict) -> dict:
    state.pop(sorted(state)[-1])
    return state


class _Payload:
    """Unpickling this creates the marker file (stand-in for any code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _nnunet_bundle(tamper_hash: bool):
    def build(ctx: Context) -> Invocation:
        import torch

        from mrn_engine.data import file_sha256

        bundle = ctx.own_bundle()
        marker = ctx.root / "PWNED"
        first = None
        for mod in ("NM", "QSM"):
            d = bundle / "nnunet" / mod
            (d / "fold_0").mkdir(parents=True)
            (d / "plans.json").write_text(
                json.dumps({"image_reader_writer": "SimpleITKIO", "configurations": {}})
            )
            labels = {"background": 0, "SN_R": 1, "SN_L": 2} if mod == "NM" else {"b": 0}
            (d / "dataset.json").write_text(json.dumps({"labels": labels}))
            ckpt = d / "fold_0" / "checkpoint_final.pth"
            torch.save({"network_weights": {}, "x": _Payload(marker)}, ckpt)
            digest = "0" * 64 if tamper_hash else file_sha256(ckpt)
            (d / "mrn_nnunet.json").write_text(
                json.dumps({"sha256": {"fold_0/checkpoint_final.pth": digest}})
            )
            first = first or ckpt
        cases = ctx.root / "cases"
        write_case(cases / GOOD, seed=1)
        keyword = "does not match" if tamper_hash else "refused to load"
        return Invocation(
            _predict(ctx, cases, bundle, "--ignore-masks"),
            2,
            [str(first), keyword],
            [cases, bundle],
            ctx.root / "out",
            failed_case=GOOD,
            must_not_exist=[marker],
        )

    return build


def _optional_t1(folder: Path) -> Path:
    path = folder / "T1.nii.gz"
    path.write_bytes(b"\x1f\x8b garbage")
    return path


def _t1_case(ctx: Context) -> Invocation:
    """A corrupt optional T1: prediction never reads T1, so both cases are predicted (exit 0).

    (``mrn cases`` is where a broken T1 is reported.)
    """
    cases = ctx.root / "cases"
    write_case(cases / GOOD, seed=1)
    _optional_t1(write_case(cases / BAD, seed=2))
    return Invocation(
        _predict(ctx, cases, ctx.bundle),
        0,
        ["2 case(s) predicted"],
        [cases, ctx.bundle],
        ctx.root / "out",
    )


def _symlinked(ctx: Context) -> Invocation:
    """Case folders that are symlinks (data on another disk) plus a link loop: found, once."""
    data = ctx.root / "elsewhere"
    write_case(data / GOOD, seed=1)
    write_case(data / BAD, seed=2)
    cases = ctx.root / "cases"
    cases.mkdir()
    for cid in (GOOD, BAD):
        (cases / cid).symlink_to(data / cid, target_is_directory=True)
    (cases / "loop").symlink_to(cases, target_is_directory=True)
    (cases / "train_cases.csv").write_text(f"{GOOD},0\n{BAD},1\n")
    return Invocation(
        ["cases", str(cases), "--quiet"], 0, ["2 case(s)", "validation: 2 ok"], [data, cases]
    )


def _duplicate_id(ctx: Context) -> Invocation:
    cases = ctx.root / "cases"
    write_case(cases / "a" / GOOD, seed=1)
    write_case(cases / "b" / GOOD, seed=2)
    return Invocation(["cases", str(cases), "--quiet"], 2, [GOOD, "found twice"], [cases])


def _arr(fn: Callable[[np.ndarray], np.ndarray], stem: str = "NM", seed: int = 2):
    return _replace(stem, fn(case_arrays(seed)[stem]))


def _one_voxel(a: np.ndarray) -> np.ndarray:
    out = np.zeros_like(a)
    out[0, 0, 0] = 1.0
    return out


def _set_voxel(value: float):
    def fn(a: np.ndarray) -> np.ndarray:
        a = a.copy()
        a[3, 3, 3] = value
        return a

    return fn


SCENARIOS: list[Scenario] = [
    # -- images --------------------------------------------------------------------------
    Scenario(
        "nm-not-gzip",
        "image",
        "NM.nii.gz holds text",
        _bad_case(_bytes("NM", b"hello"), "unreadable"),
    ),
    Scenario(
        "nm-empty", "image", "NM.nii.gz is 0 bytes", _bad_case(_bytes("NM", b""), "unreadable")
    ),
    Scenario(
        "nm-truncated", "image", "NM.nii.gz cut in half", _bad_case(_truncated("NM"), "truncated")
    ),
    Scenario(
        "qsm-truncated",
        "image",
        "QSM.nii.gz cut at 90 %",
        _bad_case(_truncated("QSM", 0.9), "truncated"),
    ),
    Scenario(
        "nm-png",
        "image",
        "a PNG renamed NM.nii.gz",
        _bad_case(_bytes("NM", b"\x89PNG\r\n\x1a\n" + b"\0" * 64), "unreadable"),
    ),
    Scenario(
        "nm-folder",
        "image",
        "a folder named NM.nii.gz",
        _bad_case(_folder_named("NM"), "is a folder"),
    ),
    Scenario(
        "qsm-missing", "image", "no QSM file", _bad_case(_missing("QSM"), "QSM.nii.gz missing")
    ),
    Scenario(
        "nm-4d",
        "image",
        "NM with 3 volumes",
        _bad_case(_arr(lambda a: np.stack([a] * 3, -1)), "expected a 3D volume"),
    ),
    Scenario(
        "nm-2d",
        "image",
        "NM is one slice (2D)",
        _bad_case(_arr(lambda a: a[:, :, 0]), "expected a 3D volume"),
    ),
    Scenario(
        "nm-all-zero", "image", "all-zero NM", _bad_case(_arr(np.zeros_like), "constant image")
    ),
    Scenario(
        "qsm-constant",
        "image",
        "QSM constant 5",
        _bad_case(_arr(lambda a: np.full_like(a, 5.0), "QSM"), "constant image"),
    ),
    Scenario(
        "nm-near-constant",
        "image",
        "NM zero but one voxel",
        _bad_case(_arr(_one_voxel), "near-constant"),
    ),
    Scenario(
        "nm-complex",
        "image",
        "complex64 NM",
        _bad_case(_arr(lambda a: (a + 1j * a).astype(np.complex64)), "complex-valued"),
    ),
    Scenario(
        "nm-3e38",
        "image",
        "NM voxel +3e38",
        _bad_case(_arr(_set_voxel(3e38)), "plausible NM range"),
    ),
    Scenario(
        "qsm-minus-3e38",
        "image",
        "QSM voxel -3e38",
        _bad_case(_arr(_set_voxel(-3e38), "QSM"), "plausible QSM range"),
    ),
    Scenario(
        "nm-nan", "image", "a NaN voxel in NM", _bad_case(_arr(_set_voxel(np.nan)), "non-finite")
    ),
    Scenario(
        "qsm-inf",
        "image",
        "an Inf voxel in QSM",
        _bad_case(_arr(_set_voxel(np.inf), "QSM"), "non-finite"),
    ),
    Scenario(
        "nm-float64-overflow",
        "image",
        "float64 NM 1e300",
        _bad_case(_arr(lambda a: _set_voxel(1e300)(a.astype(np.float64))), "overflow float32"),
    ),
    Scenario(
        "qsm-singular-affine",
        "image",
        "sform zero row, qform code 0",
        _bad_case(_singular_affine, "singular affine"),
    ),
    Scenario(
        "nm-nan-affine", "image", "NaN in the NM affine", _bad_case(_nan_affine, "NaN or Inf")
    ),
    Scenario(
        "nm-huge-nifti1",
        "image",
        "NIfTI-1 header declaring 32767^3",
        _bad_case(_huge_header(False, 32767), "header declares"),
    ),
    Scenario(
        "nm-huge-nifti2",
        "image",
        "NIfTI-2 header declaring 100000^3",
        _bad_case(_huge_header(True, 100000), "header declares"),
    ),
    Scenario(
        "qsm-grid-shape",
        "image",
        "QSM on another grid (shape)",
        _bad_case(_arr(lambda a: a[:, :, :20], "QSM"), "not on the grid"),
    ),
    Scenario(
        "qsm-grid-affine",
        "image",
        "QSM shifted by 5 mm",
        _bad_case(
            lambda f: write_nifti(
                f / "QSM.nii.gz", case_arrays(2)["QSM"], case_affine() + _shift()
            ),
            "not on the grid",
        ),
    ),
    Scenario(
        "t1-corrupt",
        "image",
        "corrupt optional T1 (not read by prediction, case predicted)",
        _t1_case,
    ),
    # -- masks ---------------------------------------------------------------------------
    Scenario(
        "nm-mask-label",
        "mask",
        "NM_mask with label 7",
        _bad_case(
            _arr(lambda a: np.where(a == 1, 7, a).astype(np.uint8), "NM_mask"),
            "unknown NM_mask label",
        ),
    ),
    Scenario(
        "qsm-mask-label",
        "mask",
        "QSM_mask with label 99",
        _bad_case(
            _arr(lambda a: np.where(a == 15, 99, a).astype(np.uint8), "QSM_mask"),
            "unknown QSM_mask label",
        ),
    ),
    Scenario(
        "mask-float",
        "mask",
        "NM_mask holding 0.5",
        _bad_case(_arr(lambda a: a.astype(np.float32) * 0.5, "NM_mask"), "non-integer"),
    ),
    Scenario(
        "mask-negative",
        "mask",
        "QSM_mask holding -1",
        _bad_case(_arr(lambda a: a.astype(np.int16) - 1, "QSM_mask"), "0..255"),
    ),
    Scenario(
        "mask-grid",
        "mask",
        "NM_mask on another grid",
        _bad_case(_arr(lambda a: a[:-2], "NM_mask"), "not on the grid"),
    ),
    # -- layout and labels ---------------------------------------------------------------
    Scenario(
        "labels-folder",
        "labels",
        "a folder named train_cases.csv",
        _label_csv(None, as_folder=True),
    ),
    Scenario("labels-value", "labels", "label 2 in train_cases.csv", _label_csv(f"{GOOD},2\n")),
    Scenario(
        "labels-unknown", "labels", "CSV names a case without folder", _label_csv("RJPD_999,1\n")
    ),
    Scenario(
        "labels-conflict",
        "labels",
        "one case labelled 0 and 1",
        _label_csv(f"{GOOD},0\n{GOOD},1\n"),
    ),
    Scenario("duplicate-id", "labels", "one case id in two folders", _duplicate_id),
    Scenario(
        "symlinked-cases",
        "labels",
        "case folders are symlinks, plus a link loop (works)",
        _symlinked,
    ),
    # -- bundle config.json --------------------------------------------------------------
    Scenario(
        "cfg-image-size-str",
        "config",
        '"image_size": "56"',
        _config(_setter("roi", "image_size", "56"), "roi.image_size"),
    ),
    Scenario(
        "cfg-image-size-0",
        "config",
        '"image_size": 0',
        _config(_setter("roi", "image_size", 0), "roi.image_size"),
    ),
    Scenario(
        "cfg-margin-negative",
        "config",
        '"margin_mm": -4',
        _config(_setter("roi", "margin_mm", -4.0), "roi.margin_mm"),
    ),
    Scenario(
        "cfg-slices-list",
        "config",
        '"slices" a list',
        _config(_setter("roi", "slices", [4, 4, 4, 4]), "roi.slices"),
    ),
    Scenario(
        "cfg-roi-list", "config", '"roi" a list', _config(_setter(None, "roi", [1, 2]), "roi")
    ),
    Scenario(
        "cfg-heads-str",
        "config",
        '"num_heads": "4"',
        _config(_setter("model", "num_heads", "4"), "model.num_heads"),
    ),
    Scenario(
        "cfg-dropout",
        "config",
        '"dropout": 1.5',
        _config(_setter("model", "dropout", 1.5), "model.dropout"),
    ),
    Scenario(
        "cfg-betas",
        "config",
        '"betas": [0.9]',
        _config(_setter("train", "betas", [0.9]), "train.betas"),
    ),
    Scenario(
        "cfg-unknown-key",
        "config",
        "unknown key",
        _config(_setter("model", "n_layers", 3), "unknown key"),
    ),
    Scenario(
        "cfg-not-json", "config", "config.json not JSON", _raw_config("{roi: 1", "not valid JSON")
    ),
    Scenario(
        "cfg-folder",
        "config",
        "config.json is a folder",
        _raw_config("", "is a folder", folder=True),
    ),
    # -- bundle weights ------------------------------------------------------------------
    Scenario(
        "weights-nan", "bundle", "one tensor all NaN", _weights(_poison(float("nan")), "non-finite")
    ),
    Scenario(
        "weights-inf", "bundle", "one tensor all Inf", _weights(_poison(float("inf")), "non-finite")
    ),
    Scenario(
        "weights-shape",
        "bundle",
        "a tensor of the wrong shape",
        _weights(_reshape, "shape mismatch"),
    ),
    Scenario(
        "weights-missing-key", "bundle", "a tensor missing", _weights(_drop_key, "missing key")
    ),
    Scenario(
        "weights-truncated",
        "bundle",
        "model.safetensors cut to a third",
        _weights(None, "cannot read weights", raw=b"truncate"),
    ),
    Scenario(
        "nnunet-pickle",
        "security",
        "crafted pickle as nnU-Net checkpoint (hash recorded)",
        _nnunet_bundle(False),
    ),
    Scenario(
        "nnunet-hash",
        "security",
        "nnU-Net checkpoint whose sha256 does not match",
        _nnunet_bundle(True),
    ),
]


def _shift() -> np.ndarray:
    m = np.zeros((4, 4))
    m[0, 3] = 5.0
    return m
