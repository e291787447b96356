"""Join the outputs of ``mrn predict --shard i/n`` runs into one challenge submission.

Each shard folder's ``predict.json`` (:mod:`mrn_engine.inference.manifest`) says which bundle
and settings made it, which shard of which cohort it is, and the digest of every output file.
The merge refuses shards of different bundles or settings, of different cohorts, a missing or
repeated shard, a case in two shards or in none, and a case folder whose files changed; it
then writes the same submission a single run would (byte for byte, given the same device and
bundle path), staged and moved into place like ``mrn predict``'s.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mrn_engine.errors import InputDataError
from mrn_engine.fileio import make_temp_dir
from mrn_engine.inference.manifest import (
    MANIFEST,
    STAGE_DIR,
    CaseRecord,
    read_json,
    write_manifest,
)
from mrn_engine.inference.submission import (
    CONFIG_JSON,
    STAGE_SUFFIX,
    OutputWriteError,
    SubmissionResult,
    publish_staged,
    write_tables,
)

#: ``probabilities.json`` meta keys that may differ between shards (joined when they do)
MACHINE_KEYS = ("device", "model")


def _load(shard_dir: Path) -> dict[str, Any]:
    if not shard_dir.is_dir():
        raise InputDataError(f"{shard_dir}: not a folder")
    data = read_json(shard_dir / MANIFEST)
    if not isinstance(data, dict) or not _well_formed(data):
        partial = (shard_dir / STAGE_DIR).is_dir()
        why = (
            "the run did not finish: rerun the same mrn predict command to resume it"
            if partial
            else "not an mrn predict output folder (no readable predict.json)"
        )
        raise InputDataError(f"{shard_dir / MANIFEST}: {why}")
    return data


def _well_formed(data: dict[str, Any]) -> bool:
    try:
        int(data["shard"]["index"]), int(data["shard"]["count"])
        return all(
            isinstance(data[k], t)
            for k, t in (("fingerprint", dict), ("meta", dict), ("cohort", list), ("cases", list))
        )
    except (KeyError, TypeError, ValueError):
        return False


def _describe(fp: dict[str, Any]) -> str:
    digest = str(fp.get("bundle_sha256") or "none")[:12]
    return (
        f"bundle {digest}, folds {fp.get('folds')}, tta {fp.get('tta')}, "
        f"nuclei {fp.get('nuclei')}, ignore-masks {fp.get('ignore_masks')}"
    )


def _config_bytes(shard_dir: Path) -> bytes:
    try:
        return (shard_dir / CONFIG_JSON).read_bytes()
    except OSError as e:
        raise InputDataError(f"{shard_dir / CONFIG_JSON}: cannot read ({e.strerror or e})") from e


def _check_same(dirs: Sequence[Path], shards: Sequence[dict[str, Any]]) -> None:
    ref_dir, ref = dirs[0], shards[0]
    for d, m in zip(dirs[1:], shards[1:], strict=True):
        if m["fingerprint"] != ref["fingerprint"]:
            what = (
                "different bundles"
                if m["fingerprint"].get("bundle_sha256") != ref["fingerprint"].get("bundle_sha256")
                else "different settings"
            )
            raise InputDataError(
                f"{d}: shards made with {what}: {ref_dir} has {_describe(ref['fingerprint'])}; "
                f"{d} has {_describe(m['fingerprint'])}"
            )
        if m.get("cohort") != ref.get("cohort"):
            raise InputDataError(
                f"{d}: shards of different cohorts ({len(m.get('cohort') or [])} case(s) here, "
                f"{len(ref.get('cohort') or [])} in {ref_dir}); run every shard on the same "
                "CASES_DIR"
            )
        if _config_bytes(d) != _config_bytes(ref_dir):
            raise InputDataError(f"{d / CONFIG_JSON}: differs from {ref_dir / CONFIG_JSON}")


def _check_shards(dirs: Sequence[Path], shards: Sequence[dict[str, Any]]) -> None:
    counts = {int(m["shard"]["count"]) for m in shards}
    if len(counts) > 1:
        raise InputDataError(
            "shards of different splits: "
            + ", ".join(
                f"{d} is {m['shard']['index']}/{m['shard']['count']}"
                for d, m in zip(dirs, shards, strict=True)
            )
        )
    (n,) = counts
    seen: dict[int, Path] = {}
    for d, m in zip(dirs, shards, strict=True):
        i = int(m["shard"]["index"])
        if i in seen:
            raise InputDataError(f"{d}: shard {i}/{n} given twice (also {seen[i]})")
        seen[i] = d
    missing = [f"{i}/{n}" for i in range(1, n + 1) if i not in seen]
    if missing:
        raise InputDataError(
            f"missing shard(s) {', '.join(missing)} of {n}: give every shard folder"
        )


def _records(
    dirs: Sequence[Path], shards: Sequence[dict[str, Any]]
) -> dict[str, tuple[Path, CaseRecord]]:
    found: dict[str, tuple[Path, CaseRecord]] = {}
    for d, m in zip(dirs, shards, strict=True):
        for c in m["cases"]:
            try:
                rec = CaseRecord.from_json(c)
            except (KeyError, TypeError, ValueError):
                raise InputDataError(f"{d / MANIFEST}: malformed case entry {c!r:.80}") from None
            if rec.case_id in found:
                raise InputDataError(
                    f"{rec.case_id}: case in two shards, {found[rec.case_id][0]} and {d}"
                )
            if rec.ok and not rec.files_match(d / rec.case_id):
                raise InputDataError(
                    f"{d / rec.case_id}: output files missing or changed since the shard was "
                    "written (rerun that shard)"
                )
            found[rec.case_id] = (d, rec)
    cohort = list(shards[0].get("cohort") or [])
    missing = [c for c in cohort if c not in found]
    if missing:
        raise InputDataError(
            f"{len(missing)} case(s) of the cohort in no shard: {', '.join(missing[:10])}"
            + (" ..." if len(missing) > 10 else "")
        )
    extra = [c for c in found if c not in set(cohort)]
    if extra:
        raise InputDataError(f"case(s) not in the cohort the shards list: {', '.join(extra[:10])}")
    return found


def _merged_meta(shards: Sequence[dict[str, Any]]) -> dict[str, Any]:
    meta = dict(shards[0]["meta"])
    for key in MACHINE_KEYS:
        values = sorted({str(m["meta"].get(key)) for m in shards})
        if len(values) > 1:
            meta[key] = ", ".join(values)
    return meta


def merge_shards(shard_dirs: Sequence[str | Path], out_dir: str | Path) -> SubmissionResult:
    """Write the submission of all shards' cases into ``out_dir`` (see the module docstring).

    Raises
    ------
    InputDataError: a shard folder is unfinished or unreadable, the shards do not fit together
        (bundles, settings, cohort, shard numbers, duplicate or missing cases), or ``out_dir``
        is one of the shard folders.
    OutputWriteError: the outputs could not be written (nothing is left in ``out_dir``).
    """
    dirs = [Path(d) for d in shard_dirs]
    out_dir = Path(out_dir)
    if not dirs:
        raise InputDataError("merge: give the shard folders to merge")
    for d in dirs:
        if out_dir.resolve() == d.resolve():
            raise InputDataError(f"{out_dir}: the merged output must not be a shard folder")
    shards = [_load(d) for d in dirs]
    _check_same(dirs, shards)
    _check_shards(dirs, shards)
    found = _records(dirs, shards)
    cohort = list(shards[0]["cohort"])
    ordered = [found[c] for c in cohort]
    folds = list(shards[0]["fingerprint"]["folds"])
    meta = _merged_meta(shards)
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(make_temp_dir(out_dir, prefix=".mrn-merge-", suffix=STAGE_SUFFIX))
    try:
        for d, rec in ordered:
            if rec.ok:
                shutil.copytree(d / rec.case_id, stage / rec.case_id, copy_function=shutil.copyfile)
        rows = [rec.row for _, rec in ordered]
        errors = [
            {"case_id": r.case_id, "error": str(r.row["error"])} for _, r in ordered if not r.ok
        ]
        write_tables(stage, rows, errors, folds, meta)
        shutil.copyfile(dirs[0] / CONFIG_JSON, stage / CONFIG_JSON)
        write_manifest(
            stage,
            fingerprint=shards[0]["fingerprint"],
            meta=meta,
            shard={"index": 1, "count": 1},
            cohort=cohort,
            records=[rec for _, rec in ordered],
        )
        publish_staged(stage, out_dir)
    except OSError as e:
        shutil.rmtree(stage, ignore_errors=True)
        raise OutputWriteError.from_os_error(e, out_dir, "the merged outputs") from e
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return SubmissionResult(out_dir, rows=rows, errors=errors)
