"""A cheap check of a backbone: linear-probe ROC AUC of its pooled embedding on PD vs HC.

Diagnosis labels are used here only to *score* the frozen embedding (pretraining never reads
them): standardised features -> L2 logistic regression, out-of-fold AUC by stratified CV on a
labelled cohort, and optionally the AUC on held-out cases of a probe fitted on the whole cohort.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mrn_engine.config import RunConfig
from mrn_engine.data.cases import CaseFiles
from mrn_engine.models.weights import load_backbone_weights
from mrn_engine.pretraining.encoder import ViTEmbedder
from mrn_engine.rois.cache import RoiCache
from mrn_engine.runtime import seed_everything
from mrn_engine.training.objective import reset_layerscale


def vit_embedder(cfg: RunConfig, weights: str | os.PathLike | None, seed: int = 1) -> ViTEmbedder:
    """The preset's ViT with ``weights`` (a ``mrn pretrain`` / DINOv2 file), or the random
    initialisation ``mrn train`` starts from (seeded, LayerScale reset) when None."""
    seed_everything(seed)
    model = ViTEmbedder(cfg)
    if weights is None:
        if cfg.train.random_init_layerscale > 0:
            reset_layerscale(model.patchnizer, cfg.train.random_init_layerscale)
    else:
        load_backbone_weights(model.patchnizer.vit, weights, cfg.model.backbone)
    return model.eval()


@torch.no_grad()
def embed_cases(
    model: ViTEmbedder,
    files: Sequence[CaseFiles],
    cfg: RunConfig,
    cache: RoiCache,
    batch_size: int = 8,
) -> np.ndarray:
    """(N, 4D) pooled backbone features of un-augmented ROI stacks."""
    out = []
    for i in range(0, len(files), batch_size):
        crops = [cache.get_or_compute(f, cfg.roi) for f in files[i : i + batch_size]]
        x = {n: torch.stack([torch.as_tensor(c[n].image) for c in crops]) for n in crops[0]}
        out.append(model.features(x).float().numpy())
    return np.concatenate(out)


def probe_auc(
    x: np.ndarray,
    y: Sequence[int],
    x_test: np.ndarray | None = None,
    y_test: Sequence[int] | None = None,
    *,
    folds: int = 5,
    seed: int = 1,
    c: float = 1.0,
) -> dict[str, Any]:
    """Out-of-fold AUC on ``(x, y)`` and, if given, the AUC on ``(x_test, y_test)``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(y, int)
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    p = cross_val_predict(probe, x, y, cv=cv, method="predict_proba")[:, 1]
    result: dict[str, Any] = {"cv_auc": float(roc_auc_score(y, p)), "n": int(len(y))}
    if x_test is not None and y_test is not None:
        probe.fit(x, y)
        pt = probe.predict_proba(x_test)[:, 1]
        result.update(
            heldout_auc=float(roc_auc_score(np.asarray(y_test, int), pt)), n_heldout=len(pt)
        )
    return result
