"""Type and range validation of :class:`~mrn_engine.config.RunConfig` values.

``config.json`` comes from users and shared bundles: a string where a number belongs, a list
where a mapping belongs or an out-of-range value must be a :class:`ConfigError` naming the key,
not a ``TypeError`` deep inside the model or a misleading "weights do not fit".
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable
from typing import Any

from mrn_engine.errors import ConfigError

#: smallest slice size a ViT backbone can turn into patches (DINOv2 patch size)
MIN_IMAGE_SIZE = 14

Rule = Callable[[Any], str | None]


def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be >= 0"


def _unit(v: Any) -> str | None:
    return None if 0 <= v < 1 else "must lie in [0, 1)"


def _unit_closed(v: Any) -> str | None:
    return None if 0 <= v <= 1 else "must lie in [0, 1]"


def _percentiles(v: Any) -> str | None:
    lo, hi = v
    return None if 0 <= lo < hi <= 100 else "must be (low, high) with 0 <= low < high <= 100"


def _all_positive(v: Any) -> str | None:
    items = v.values() if isinstance(v, dict) else v
    return None if all(x > 0 for x in items) else "every value must be > 0"


def _image_size(v: Any) -> str | None:
    return None if v >= MIN_IMAGE_SIZE else f"must be >= {MIN_IMAGE_SIZE} (one ViT patch)"


#: ``section.field`` -> range rule (types come from the dataclass annotations)
RULES: dict[str, Rule] = {
    "roi.image_size": _image_size,
    "roi.slices": _all_positive,
    "roi.margin_mm": _non_negative,
    "roi.nm_clip_percentiles": _percentiles,
    "roi.qsm_clip_percentiles": _percentiles,
    "roi.nm_window_scale": _positive,
    "roi.qsm_window_scale": _positive,
    "model.embed_dim": _positive,
    "model.num_heads": _positive,
    "model.max_slices": _positive,
    "model.ffa_depth": _non_negative,
    "model.sfa_depth": _non_negative,
    "model.dpt_channels": _all_positive,
    "model.dpt_fusion": _positive,
    "model.head_hidden": _positive,
    "model.dropout": _unit,
    "model.drop_path": _unit,
    "model.proj_dim": _positive,
    "model.moco_momentum": _unit_closed,
    "model.moco_bank_size": _positive,
    "model.moco_temperature": _positive,
    "model.lambda_seg": _non_negative,
    "model.lambda_con": _non_negative,
    "model.num_classes": lambda v: None if v >= 2 else "must be >= 2",
    "model.seres_widths": _all_positive,
    "train.pretrain_epochs": _non_negative,
    "train.epochs": _non_negative,
    "train.batch_size": _positive,
    "train.lr_backbone": _non_negative,
    "train.wd_backbone": _non_negative,
    "train.lr_fusion": lambda v: None if v is None or v >= 0 else "must be >= 0 or null",
    "train.lr_head": _positive,
    "train.wd_head": _non_negative,
    "train.betas": lambda v: None if all(0 <= b < 1 for b in v) else "must lie in [0, 1)",
    "train.folds": lambda v: None if v >= 2 else "must be >= 2",
    "train.num_workers": _non_negative,
    "train.random_init_layerscale": _non_negative,
}


def _type_problem(value: Any, hint: Any) -> str | None:
    """Why ``value`` does not match the annotation ``hint`` (None = it does)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        problems = [_type_problem(value, a) for a in args]
        return None if any(p is None for p in problems) else problems[0]
    if hint is type(None):
        return None if value is None else "expected null"
    if hint is bool:
        return None if isinstance(value, bool) else "expected true or false"
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else "expected an integer"
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and not math.isfinite(value):
            return "expected a finite number"
        return None if ok else "expected a number"
    if hint is str:
        return None if isinstance(value, str) else "expected a string"
    if origin is dict:
        if not isinstance(value, dict):
            return "expected a mapping"
        for k, v in value.items():
            p = _type_problem(k, args[0]) or _type_problem(v, args[1])
            if p:
                return f"entry {k!r}: {p}"
        return None
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            return f"expected a list of {len(args)}"
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        if len(value) != len(args):
            return f"expected a list of {len(args)} values, got {len(value)}"
        for i, (v, a) in enumerate(zip(value, args, strict=True)):
            p = _type_problem(v, a)
            if p:
                return f"item {i}: {p}"
        return None
    return None  # unannotated / unusual types are not checked


def validate_section(obj: Any, section: str) -> None:
    """Check every field of one config dataclass (types, then range rules)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            continue
        key = f"{section}.{f.name}"
        problem = _type_problem(value, hints.get(f.name, Any))
        if problem is None and key in RULES:
            problem = RULES[key](value)
        if problem:
            raise ConfigError(f"{key} = {value!r}: {problem}")
