"""Evaluating a model: zero-shot, linear probe, attack success, retrieval, re-assignment.

Everything goes through one small Encoder face (normalised image and text
embeddings), so that the arithmetic here is tested with a hand-made encoder and used
with a real model through `otcclip.models`. Attack success always compares with the
attack's target label and, for backdoors, counts only test images whose true class
is not the target (see `otcclip.metrics`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from otcclip import metrics
from otcclip.attacks import TRIGGERS, Manifest, apply_trigger, poisoned_ids
from otcclip.data.fmnist import CLASSNAMES, classes_in_captions
from otcclip.data.readers import read_pair_columns, read_pairs
from otcclip.data.table import EvalSet, PairTable

RECALL_KS = (1, 5, 10)
PROBE_CS = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)


@runtime_checkable
class Encoder(Protocol):
    """What evaluation needs from a model: L2-normalised float32 embeddings."""

    def images(self, images: np.ndarray) -> np.ndarray: ...

    def texts(self, captions: list[str]) -> np.ndarray: ...


class BundleEncoder:
    """An Encoder over an `otcclip.models.ModelBundle` (embed_images / embed_texts)."""

    def __init__(self, bundle: Any, batch_size: int = 256, progress: bool = False) -> None:
        self.bundle = bundle
        self.batch_size = batch_size
        self.progress = progress

    def images(self, images: np.ndarray) -> np.ndarray:
        from otcclip.models import embed_images

        out = embed_images(self.bundle, images, batch_size=self.batch_size, progress=self.progress)
        return np.asarray(out[0] if isinstance(out, tuple) else out, dtype=np.float32)

    def texts(self, captions: list[str]) -> np.ndarray:
        from otcclip.models import embed_texts

        out = embed_texts(self.bundle, captions, batch_size=self.batch_size, progress=self.progress)
        return np.asarray(out[0] if isinstance(out, tuple) else out, dtype=np.float32)


def as_encoder(model: Any, batch_size: int = 256, progress: bool = False) -> Encoder:
    """An Encoder as is, or a ModelBundle wrapped in one."""
    if isinstance(model, Encoder):
        return model
    if hasattr(model, "model") and hasattr(model, "tokenizer"):
        return BundleEncoder(model, batch_size=batch_size, progress=progress)
    raise TypeError("evaluate needs a ModelBundle (otcclip.models) or an Encoder")


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def zero_shot_weights(encoder: Encoder, eval_set: EvalSet) -> np.ndarray:
    """(C, D) class embeddings: each class's prompts (names x templates), averaged, renormalised."""
    prompts = eval_set.class_prompts()
    flat = [p for class_prompts in prompts for p in class_prompts]
    emb = _normalise(encoder.texts(flat))
    bounds = np.cumsum([0, *(len(p) for p in prompts)])
    means = [emb[bounds[c] : bounds[c + 1]].mean(axis=0) for c in range(len(prompts))]
    return _normalise(np.stack(means))


def zero_shot_scores(encoder: Encoder, images: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return _normalise(encoder.images(images)) @ weights.T


def zero_shot(encoder: Encoder, eval_set: EvalSet, weights: np.ndarray | None = None) -> dict:
    """Top-1 / top-5 zero-shot accuracy with the prompt ensemble."""
    weights = zero_shot_weights(encoder, eval_set) if weights is None else weights
    scores = zero_shot_scores(encoder, eval_set.images, weights)
    k5 = min(5, scores.shape[1])
    return {
        "top1": metrics.topk_accuracy(scores, eval_set.labels, 1),
        "top5": metrics.topk_accuracy(scores, eval_set.labels, k5),
        "n": len(eval_set),
    }


def linear_probe(
    encoder: Encoder,
    train: EvalSet,
    test: EvalSet,
    seed: int = 0,
    cs: Sequence[float] = PROBE_CS,
    features: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict:
    """Logistic regression on frozen normalised image features; C picked on a held-out fifth."""
    from sklearn.linear_model import LogisticRegression

    x_train, x_test = features or (
        _normalise(encoder.images(train.images)),
        _normalise(encoder.images(test.images)),
    )
    y_train, y_test = train.labels, test.labels
    if len(np.unique(y_train)) < 2:
        raise ValueError("a linear probe needs at least two classes in its training set")
    order = np.random.default_rng(seed).permutation(len(y_train))
    cut = max(1, len(order) // 5)
    val, fit = order[:cut], order[cut:]

    def model(c: float) -> Any:
        return LogisticRegression(C=c, max_iter=2000, random_state=seed)

    best_c, best_acc = cs[0], -1.0
    if len(cs) > 1 and len(np.unique(y_train[fit])) > 1:
        for c in cs:
            acc = float(
                (
                    model(c).fit(x_train[fit], y_train[fit]).predict(x_train[val]) == y_train[val]
                ).mean()
            )
            if acc > best_acc:
                best_c, best_acc = c, acc
    final = model(best_c).fit(x_train, y_train)
    return {
        "accuracy": float((final.predict(x_test) == y_test).mean()),
        "C": float(best_c),
        "n_train": len(y_train),
        "n_test": len(y_test),
    }


def attack_success(
    encoder: Encoder, eval_set: EvalSet, manifests: Sequence[Manifest], weights: np.ndarray
) -> list[dict]:
    """Per attack: targeted ASR on its target images, or backdoor ASR on triggered test images."""
    out = []
    for m in manifests:
        entry: dict[str, Any] = {"attack": m.attack, "target": m.target_name}
        if m.targets:
            if m.target_images is None:
                raise ValueError(f"the {m.attack} manifest has no target images loaded")
            pred = metrics.predict(zero_shot_scores(encoder, m.target_images, weights))
            true = np.asarray(m.targets["true_labels"], dtype=np.int64)
            entry.update(
                kind="targeted",
                asr=metrics.targeted_asr(pred, m.target_label),
                n=len(pred),
                hits=int((pred == m.target_label).sum()),
                true_class_accuracy=float((pred == true).mean()),
                predictions=[CLASSNAMES[p] for p in pred],
            )
        elif m.trigger and m.trigger.get("kind") in TRIGGERS:
            others = eval_set.labels != m.target_label
            clean = eval_set.images[others]
            triggered = apply_trigger(clean, m)
            pred = metrics.predict(zero_shot_scores(encoder, triggered, weights))
            base = metrics.predict(zero_shot_scores(encoder, clean, weights))
            labels = eval_set.labels[others]
            entry.update(
                kind="backdoor",
                trigger=m.trigger["kind"],
                label_consistent=bool(m.params.get("label_consistent")),
                asr=metrics.backdoor_asr(pred, labels, m.target_label),
                # How often the target is predicted without the trigger: the floor of the ASR.
                baseline=metrics.backdoor_asr(base, labels, m.target_label),
                n=int(others.sum()),
            )
        else:
            raise ValueError(f"manifest of attack {m.attack!r} has neither targets nor a trigger")
        out.append(entry)
    return out


def retrieval(encoder: Encoder, table: PairTable, ks: Sequence[int] = RECALL_KS) -> dict:
    """Image-text recall@k on held-out scenes; identical caption texts all count as right."""
    sim = _normalise(encoder.images(table.images)) @ _normalise(encoder.texts(table.captions)).T
    _, group = np.unique(np.asarray(table.captions, dtype=object), return_inverse=True)
    positives = group[:, None] == group[None, :]
    ks = tuple(k for k in ks if k <= len(table))
    out = metrics.recall_at_k(sim.astype(np.float32), ks, positives)
    out["n"] = len(table)
    return out


def reassignment(
    matching: str | os.PathLike[str],
    manifests: Sequence[Manifest],
    train: str | os.PathLike[str] | PairTable | None = None,
) -> dict:
    """Precision / recall of a matching output against the poison the manifests list.

    matching: a parquet with 'id' and 'caption' (the assigned one; null when
    unassigned) and optionally 'changed'; without 'changed', the caption is compared
    with the original one in `train` (the poisoned data). With class annotations in
    `train` (fashion-scenes) it also reports how many clean pairs hold a caption of
    their true content, before and after, and how many poisoned pairs still name
    their attack's target.
    """
    cols = read_pair_columns(matching, ["id", "caption", "changed"])
    if "id" not in cols or "caption" not in cols:
        raise ValueError(f"{matching}: a matching output needs 'id' and 'caption' columns")
    ids = cols["id"]
    captions: list = cols["caption"]  # type: ignore[assignment]
    original = _train_columns(train)
    if original is not None:
        rows = _rows(original["id"], ids, "the matching output")
    changed = cols.get("changed")
    if changed is None:
        if original is None:
            raise ValueError(
                f"{matching} has no 'changed' column; pass the original data to compare"
            )
        before = original["caption"]
        changed = np.array(
            [c is None or c != before[r] for c, r in zip(captions, rows, strict=True)]
        )
    changed = np.asarray(changed, dtype=bool) | np.array([c is None for c in captions])
    if original is not None:
        _check_same_data(matching, captions, changed, original["caption"], rows)
    bad = poisoned_ids(manifests)
    is_poisoned = np.isin(ids, bad)
    out: dict[str, Any] = metrics.reassignment_precision_recall(is_poisoned, changed)
    out["n"] = len(ids)
    if original is not None:
        out["n_data"] = len(original["id"])  # the table says when the output covers fewer
    missing = np.setdiff1d(bad, ids)
    if len(missing):
        out["poisoned_missing"] = len(missing)  # poisoned ids absent from the matching output
    if original is not None and "image_classes" in original:
        image_classes = original["image_classes"][rows]
        after = classes_in_captions([c or "" for c in captions])
        clean = ~is_poisoned
        out["clean_true_content"] = metrics.true_content_share(image_classes, after, clean)
        out["clean_true_content_before"] = metrics.true_content_share(
            image_classes, classes_in_captions([original["caption"][r] for r in rows]), clean
        )
        per_attack = {}
        for m in manifests:
            if m.params.get("label_consistent"):
                continue  # its captions are true; naming the target is no poison
            mask = np.isin(ids, np.asarray(m.poisoned_ids, dtype=np.int64))
            if mask.any():
                per_attack[m.attack] = metrics.names_target_share(after, m.target_label, mask)
        out["poisoned_still_naming_target"] = per_attack
    return out


def _check_same_data(
    matching: Any, captions: list, changed: np.ndarray, before: list, rows: np.ndarray
) -> None:
    """Refuse a matching output of other data whose ids happen to fall in this data's range.

    A pair the matching left unchanged holds its own caption, so it must read as the
    data's row of that id; an output of another dataset fails this on most rows.
    """
    kept = np.flatnonzero(~changed)
    differ = [int(i) for i in kept if captions[i] != before[rows[i]]]
    if differ:
        raise ValueError(
            f"{matching}: {len(differ)} of its {len(kept)} unchanged pairs hold another caption "
            f"than the data's row of the same id (e.g. row {differ[0]}): the matching output "
            "comes from other data than --poison-dir's"
        )


def _train_columns(train: str | os.PathLike[str] | PairTable | None) -> dict | None:
    if train is None:
        return None
    if isinstance(train, PairTable):
        cols: dict[str, Any] = {"id": train.ids, "caption": train.captions}
        if train.has_classes:
            cols["image_classes"] = train.image_classes
        return cols
    if Path(train).is_dir():  # shards: no column store, so read them whole
        return _train_columns(read_pairs(train))
    return read_pair_columns(train, ["id", "caption", "image_classes"])


def _rows(all_ids: np.ndarray, ids: np.ndarray, what: str) -> np.ndarray:
    order = np.argsort(all_ids, kind="stable")
    pos = np.minimum(np.searchsorted(all_ids, ids, sorter=order), len(all_ids) - 1)
    rows = order[pos]
    unknown = all_ids[rows] != ids
    if unknown.any():
        raise ValueError(
            f"{int(unknown.sum())} ids of {what} are not in the data, "
            f"e.g. {ids[unknown][:5].tolist()}"
        )
    return rows


def evaluate(
    model: Any,
    eval_set: EvalSet,
    manifests: Sequence[Manifest] = (),
    probe: tuple[EvalSet, EvalSet] | None = None,
    *,
    test_scenes: PairTable | None = None,
    matching: str | os.PathLike[str] | None = None,
    train: str | os.PathLike[str] | PairTable | None = None,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = False,
) -> dict:
    """Every metric that applies, as one JSON-ready dict (NaN/undefined as None).

    Keys: zero_shot_top1, zero_shot_top5, linear_probe, targeted_asr (all target images
    of all targeted attacks), backdoor_asr (mean over backdoor attacks), attacks
    (per attack), recall (i2t@k / t2i@k), reassignment; None where not measured.
    """
    encoder = as_encoder(model, batch_size=batch_size, progress=progress)
    weights = zero_shot_weights(encoder, eval_set)
    zs = zero_shot(encoder, eval_set, weights)
    result: dict[str, Any] = {
        "zero_shot_top1": zs["top1"],
        "zero_shot_top5": zs["top5"],
        "n_zero_shot": zs["n"],
        "linear_probe": None,
        "targeted_asr": None,
        "backdoor_asr": None,
        "attacks": [],
        "recall": None,
        "reassignment": None,
        "seed": seed,
    }
    if probe is not None:
        lp = linear_probe(encoder, probe[0], probe[1], seed=seed)
        result["linear_probe"] = lp["accuracy"]
        result["linear_probe_detail"] = lp
    if manifests:
        attacks = attack_success(encoder, eval_set, manifests, weights)
        result["attacks"] = attacks
        targeted = [a for a in attacks if a["kind"] == "targeted"]
        if targeted:
            hits, n = sum(a["hits"] for a in targeted), sum(a["n"] for a in targeted)
            result["targeted_asr"] = hits / n
        backdoors = [a["asr"] for a in attacks if a["kind"] == "backdoor"]
        if backdoors:
            result["backdoor_asr"] = float(np.mean(backdoors))
    if test_scenes is not None:
        result["recall"] = retrieval(encoder, test_scenes)
    if matching is not None:
        result["reassignment"] = reassignment(matching, manifests, train)
    return _json_ready(result)


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def format_report(result: dict) -> str:
    """A readable two-column table of an evaluate() result."""
    rows: list[tuple[str, str]] = [
        ("zero-shot top-1", _pct(result.get("zero_shot_top1"))),
        ("zero-shot top-5", _pct(result.get("zero_shot_top5"))),
    ]
    if result.get("val_zero_shot_top1") is not None:
        rows.append(
            (
                "validation zero-shot top-1",
                f"{_pct(result['val_zero_shot_top1'])}  ({result.get('n_val')} clean images)",
            )
        )
    if result.get("linear_probe") is not None:
        detail = result.get("linear_probe_detail", {})
        rows.append(("linear probe", f"{_pct(result['linear_probe'])}  (C={detail.get('C')})"))
    for a in result.get("attacks", []):
        if a["kind"] == "targeted":
            rows.append(
                (
                    f"targeted ASR -> {a['target']}",
                    f"{_pct(a['asr'])}  ({a['hits']} of {a['n']} targets)",
                )
            )
        else:
            name = a["trigger"] + (" label-consistent" if a["label_consistent"] else "")
            if a["attack"] == "adaptive":
                name = f"adaptive ({name})"
            rows.append(
                (
                    f"backdoor ASR {name} -> {a['target']}",
                    f"{_pct(a['asr'])}  (no trigger {_pct(a['baseline'])})",
                )
            )
    recall = result.get("recall")
    if recall:
        ks = sorted(int(k.split("@")[1]) for k in recall if k.startswith("i2t@"))
        for way, label in (("i2t", "image->text"), ("t2i", "text->image")):
            values = " / ".join(_pct(recall[f"{way}@{k}"]) for k in ks)
            rows.append((f"recall@{'/'.join(map(str, ks))} {label}", values))
    re = result.get("reassignment")
    if re:
        rows.append(("re-assignment precision", _pct(re.get("precision"))))
        rows.append(("re-assignment recall", _pct(re.get("recall"))))
        rows.append(("pairs changed", f"{re['n_changed']} of {re['n']}"))
        if re.get("n_data") is not None and re["n"] < re["n_data"]:
            rows.append(("matching covers", f"only {re['n']} of the data's {re['n_data']} rows"))
        if re.get("poisoned_missing"):
            rows.append(("poisoned pairs missing", f"{re['poisoned_missing']} (not in the output)"))
        if "clean_true_content" in re:
            rows.append(
                (
                    "clean pairs with true content",
                    f"{_pct(re['clean_true_content'])}  "
                    f"(before {_pct(re['clean_true_content_before'])})",
                )
            )
        for attack, share in re.get("poisoned_still_naming_target", {}).items():
            rows.append((f"{attack} pairs still naming target", _pct(share)))
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{'metric':<{width}}value", "-" * (width + 24)]
    lines += [f"{name:<{width}}{value}" for name, value in rows]
    return "\n".join(lines)


def load_eval_inputs(
    poison_dir: str | os.PathLike[str] | None,
) -> tuple[list[Manifest], dict, Path | None]:
    """The manifests, data description and pairs (train.parquet or train/ shards) of a poison
    directory (if any)."""
    if poison_dir is None:
        return [], {}, None
    from otcclip.attacks import load_manifests
    from otcclip.data import pairs_in

    manifests, data = load_manifests(poison_dir)
    try:
        return manifests, data, pairs_in(poison_dir)
    except FileNotFoundError:
        return manifests, data, None


def _eval_image_size(ctx: Any, manifests: Sequence[Manifest] | None) -> int:
    """The test scenes' size: the training images', or the model's when those are too small.

    Test scenes need MIN_IMAGE_SIZE px; training on smaller images of one's own used to
    stop with "image_size must be an int >= 56, got 48", a number the user never typed.
    A trigger was made for the data's size, so with one the data must be large enough.
    """
    from otcclip.data.scenes import MIN_IMAGE_SIZE

    # a streamed run has no table: the side its shards record (None: unknown)
    size = int(ctx.table.images.shape[1]) if ctx.table is not None else ctx.image_side
    if size is None:
        return max(MIN_IMAGE_SIZE, int(getattr(ctx.bundle, "image_size", MIN_IMAGE_SIZE)))
    if size >= MIN_IMAGE_SIZE:
        return size
    triggers = [m for m in (ctx.manifests if manifests is None else manifests) if m.trigger]
    if triggers:
        raise ValueError(
            f"the training images are {size} px, but evaluating their backdoor needs test "
            f"scenes of at least {MIN_IMAGE_SIZE} px; pass --image-size {MIN_IMAGE_SIZE} "
            "(or --eval-every 0)"
        )
    return max(MIN_IMAGE_SIZE, int(getattr(ctx.bundle, "image_size", MIN_IMAGE_SIZE)))


def validation_split(
    n: int,
    seed: int,
    image_size: int,
    seen: Sequence[EvalSet],
    root: str | os.PathLike[str] | None = None,
) -> EvalSet:
    """The clean validation images: test-pool images in none of the `seen` sets.

    Tuning chooses by zero-shot on these, so that the images a table reports never
    decide a setting. The training loop's evaluation and `otcclip eval --val-size`
    draw them by this one rule, so a saved model scores what its run scored.
    """
    from otcclip.data import validation_set

    exclude = np.concatenate([s.ids for s in seen]) if seen else None
    return validation_set(n, seed, image_size, exclude=exclude, root=root)


def validation_zero_shot(
    model: Any,
    n: int,
    seed: int,
    image_size: int,
    seen: Sequence[EvalSet],
    root: str | os.PathLike[str] | None = None,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Zero-shot top-1 on the validation split, as `val_zero_shot_top1` and `n_val`."""
    split = validation_split(n, seed, image_size, seen, root)
    zs = zero_shot(as_encoder(model, batch_size=batch_size), split)
    return {"val_zero_shot_top1": zs["top1"], "n_val": zs["n"]}


class EpochEvaluation:
    """A training callback: evaluate every `every` epochs and after the last one.

    Zero-shot always; targeted/backdoor ASR when the run has poison manifests;
    the linear probe (slower) only after the last epoch. It duck-types the
    trainer's `Callback` so that this module never imports the trainer (data
    flows one way: training -> evaluation). Only the main process evaluates.
    With `val_size`, also zero-shot on a clean validation split of test-pool images
    outside the zero-shot and probe sets (`val_zero_shot_top1`): the metric that
    tuning chooses by, so that the reported images never decide a setting.
    """

    def __init__(
        self,
        every: int,
        epochs: int,
        eval_size: int = 1000,
        probe_size: int = 0,
        seed: int = 0,
        manifests: Sequence[Manifest] | None = None,
        val_size: int = 0,
    ) -> None:
        self.every = every
        self.val_size = val_size
        self.validation: EvalSet | None = None
        self.epochs = epochs
        self.eval_size = eval_size
        self.probe_size = probe_size
        self.seed = seed
        self.manifests = manifests
        self.sets: tuple[EvalSet, tuple[EvalSet, EvalSet] | None] | None = None

    def on_train_start(self, ctx: Any) -> None:
        if not ctx.is_main:
            return
        from otcclip.data import probe_sets, zero_shot_set

        image_size = _eval_image_size(ctx, self.manifests)
        eval_set = zero_shot_set(self.eval_size, seed=self.seed, image_size=image_size)
        probe = (
            probe_sets(self.probe_size, self.probe_size, seed=self.seed, image_size=image_size)
            if self.probe_size
            else None
        )
        self.sets = (eval_set, probe)
        if self.val_size:
            seen = [eval_set] + ([] if probe is None else list(probe))
            self.validation = validation_split(self.val_size, self.seed, image_size, seen)

    def on_step_end(self, ctx: Any, info: dict) -> None:
        pass

    def on_checkpoint(self, ctx: Any, path: Path, info: dict) -> None:
        pass

    def on_epoch_end(self, ctx: Any, epoch: int, metrics: dict) -> dict | None:
        done = epoch + 1
        last = done == self.epochs
        if not ctx.is_main or self.sets is None or not (done % self.every == 0 or last):
            return None
        eval_set, probe = self.sets
        manifests = ctx.manifests if self.manifests is None else self.manifests
        result = evaluate(
            ctx.bundle,
            eval_set,
            manifests=manifests,
            probe=probe if last else None,
            seed=self.seed,
        )
        if self.validation is not None:  # the tuning metric: never the reported images
            zs = zero_shot(as_encoder(ctx.bundle), self.validation)
            result["val_zero_shot_top1"] = zs["top1"]
            result["n_val"] = zs["n"]
        return {"eval": result}

    def on_train_end(self, ctx: Any, result: Any) -> None:
        pass
