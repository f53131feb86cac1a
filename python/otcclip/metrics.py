"""Metrics as pure functions on arrays: accuracy, attack success, retrieval, re-assignment.

Written against the mistakes of public defense code: an attack success rate always
compares the prediction with the attack's TARGET label (not with the true label), a
backdoor ASR leaves out test images whose true class is the target (they would count
as successes for free), and ties in a ranking count against the model (a model that
scores everything alike must not get perfect recall).
"""

from __future__ import annotations

import math

import numpy as np


def _labels(labels: np.ndarray, name: str, n: int | None = None) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"{name} must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if n is not None and len(labels) != n:
        raise ValueError(f"{name} has {len(labels)} entries; expected {n}")
    return labels.astype(np.int64, copy=False)


def _scores(scores: np.ndarray, name: str = "scores") -> np.ndarray:
    scores = np.asarray(scores)
    if scores.ndim != 2 or not np.issubdtype(scores.dtype, np.floating):
        raise TypeError(f"{name} must be a 2-D float array, got {scores.dtype} {scores.shape}")
    if np.isnan(scores).any():
        raise ValueError(f"{name} contains NaN")
    return scores


def topk_correct(scores: np.ndarray, labels: np.ndarray, k: int = 1) -> np.ndarray:
    """bool (N,): whether the true class ranks within the top k, ties counted against.

    The rank of the true class is the number of classes scoring at least as high,
    other than itself.
    """
    scores = _scores(scores)
    labels = _labels(labels, "labels", len(scores))
    n, c = scores.shape
    if not 1 <= k <= c:
        raise ValueError(f"k must be in 1..{c} (the number of classes), got {k}")
    if n and (labels.min() < 0 or labels.max() >= c):
        raise ValueError(f"labels must be in 0..{c - 1}")
    true = scores[np.arange(n), labels]
    ahead = (scores >= true[:, None]).sum(axis=1) - 1
    return ahead < k


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Share of rows whose true class is among the k best-scored (ties counted against)."""
    correct = topk_correct(scores, labels, k)
    return float(correct.mean()) if len(correct) else math.nan


def predict(scores: np.ndarray) -> np.ndarray:
    """Top-1 class per row (lowest index among ties, so a constant score predicts class 0)."""
    return np.argmax(_scores(scores), axis=1).astype(np.int64)


def targeted_asr(predictions: np.ndarray, target_labels: np.ndarray | int) -> float:
    """Share of target images predicted as the attack's target label y' (not their true class)."""
    predictions = _labels(predictions, "predictions")
    if np.isscalar(target_labels):
        target_labels = np.full(len(predictions), int(target_labels))
    targets = _labels(np.asarray(target_labels), "target_labels", len(predictions))
    if not len(predictions):
        raise ValueError("targeted ASR needs at least one target image")
    return float((predictions == targets).mean())


def backdoor_asr(predictions: np.ndarray, true_labels: np.ndarray, target_label: int) -> float:
    """Share of triggered test images whose true class is not the target, predicted as the target.

    Images of the target class are left out: they are "classified as the target" with
    or without a backdoor.
    """
    predictions = _labels(predictions, "predictions")
    true_labels = _labels(true_labels, "true_labels", len(predictions))
    keep = true_labels != int(target_label)
    if not keep.any():
        raise ValueError("backdoor ASR needs test images whose true class is not the target")
    return float((predictions[keep] == int(target_label)).mean())


def _ranks(scores: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """Per row, how many negatives score at least as high as the best positive."""
    if positives.shape != scores.shape or positives.dtype != bool:
        raise ValueError(f"positives must be a bool array of shape {scores.shape}")
    has = positives.any(axis=1)
    if not has.all():
        raise ValueError(f"{int((~has).sum())} queries have no positive")
    best = np.where(positives, scores, -np.inf).max(axis=1)
    return ((scores >= best[:, None]) & ~positives).sum(axis=1)


def recall_at_k(
    similarity: np.ndarray,
    ks: tuple[int, ...] = (1, 5, 10),
    positives: np.ndarray | None = None,
) -> dict[str, float]:
    """Image-to-text and text-to-image recall@k from an (images x texts) similarity matrix.

    positives: bool (N_images, N_texts), which texts are right for which image (the
    diagonal of a square matrix by default; e.g. every copy of a duplicate caption).
    A query is a hit at k when fewer than k wrong items score at least as high as its
    best right one. Keys: 'i2t@k', 't2i@k'.
    """
    sim = _scores(similarity, "similarity")
    if positives is None:
        if sim.shape[0] != sim.shape[1]:
            raise ValueError("a non-square similarity matrix needs `positives`")
        positives = np.eye(sim.shape[0], dtype=bool)
    positives = np.asarray(positives)
    if any(k < 1 for k in ks):
        raise ValueError(f"recall ks must be >= 1, got {ks}")
    i2t = _ranks(sim, positives)
    t2i = _ranks(sim.T, positives.T)
    out = {f"i2t@{k}": float((i2t < k).mean()) for k in ks}
    out.update({f"t2i@{k}": float((t2i < k).mean()) for k in ks})
    return out


def _flags(flags: np.ndarray, name: str, n: int | None = None) -> np.ndarray:
    flags = np.asarray(flags)
    if flags.ndim != 1 or flags.dtype != bool:
        raise TypeError(f"{name} must be a 1-D bool array, got {flags.dtype} {flags.shape}")
    if n is not None and len(flags) != n:
        raise ValueError(f"{name} has {len(flags)} entries; expected {n}")
    return flags


def reassignment_precision_recall(poisoned: np.ndarray, changed: np.ndarray) -> dict[str, float]:
    """How well re-assignment hits the poison: precision = poisoned among changed pairs,
    recall = changed among poisoned pairs (NaN when undefined), plus the counts."""
    poisoned = _flags(poisoned, "poisoned")
    changed = _flags(changed, "changed", len(poisoned))
    hit = int((poisoned & changed).sum())
    n_changed, n_poisoned = int(changed.sum()), int(poisoned.sum())
    return {
        "precision": hit / n_changed if n_changed else math.nan,
        "recall": hit / n_poisoned if n_poisoned else math.nan,
        "n_changed": n_changed,
        "n_poisoned": n_poisoned,
        "n_poisoned_changed": hit,
        "n_clean_changed": n_changed - hit,
    }


def true_content_share(
    image_classes: np.ndarray,
    caption_classes: np.ndarray,
    mask: np.ndarray | None = None,
    mode: str = "exact",
) -> float:
    """Share of pairs (within mask) whose caption names what the image shows.

    'exact': the caption names exactly the image's classes; 'subset': it names at least
    one class and only classes the image shows. Answers "how many clean pairs still
    hold a caption of their true content" after re-assignment.
    """
    image_classes = np.asarray(image_classes).astype(bool)
    caption_classes = np.asarray(caption_classes).astype(bool)
    if image_classes.ndim != 2 or image_classes.shape != caption_classes.shape:
        raise ValueError(
            f"class arrays must both be (N, C), got {image_classes.shape}, {caption_classes.shape}"
        )
    if mask is None:
        mask = np.ones(len(image_classes), dtype=bool)
    mask = _flags(mask, "mask", len(image_classes))
    if mode == "exact":
        ok = (image_classes == caption_classes).all(axis=1)
    elif mode == "subset":
        ok = caption_classes.any(axis=1) & ~(caption_classes & ~image_classes).any(axis=1)
    else:
        raise ValueError(f"mode must be 'exact' or 'subset', got {mode!r}")
    return float(ok[mask].mean()) if mask.any() else math.nan


def names_target_share(caption_classes: np.ndarray, target_label: int, mask: np.ndarray) -> float:
    """Share of pairs (within mask) whose caption names the target class: for poisoned
    pairs after re-assignment, how many still carry the poison's label."""
    caption_classes = np.asarray(caption_classes)
    mask = _flags(mask, "mask", len(caption_classes))
    named = caption_classes[:, int(target_label)].astype(bool)
    return float(named[mask].mean()) if mask.any() else math.nan
