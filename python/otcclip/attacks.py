"""Poisoning attacks on image-caption data, each with a manifest of exactly what it touched.

Every attack is deterministic given its seed, and its trigger is a fixed object stored
in the manifest (the BadNet patch, the blend pattern, the warp field), so that
evaluation applies the very same trigger to test images without drawing anything.
A defense is only as credible as the attacks it is measured against; these follow:
- targeted poisoning (Carlini & Terzis 2022): test images of class y, each added with
  n captions naming y';
- backdoors: BadNet (Gu et al. 2017), blended (Chen et al. 2017), SIG (Barni et al.
  2019), WaNet (Nguyen & Tran 2021), and a label-consistent variant (only images that
  show the target class get the trigger; captions untouched);
- an adaptive attack on OT matching: the poisoned caption keeps describing the image's
  true content and adds the target, so that most words still align with patches.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from otcclip.atomic import atomic_path, write_text
from otcclip.data.fmnist import CLASSNAMES, SYNONYMS, class_index, with_article
from otcclip.data.scenes import MIN_IMAGE_SIZE, caption_for, target_scenes
from otcclip.data.table import PairTable

ATTACKS: tuple[str, ...] = (
    "targeted",
    "targeted-adaptive",
    "badnet",
    "blended",
    "sig",
    "wanet",
    "adaptive",
)
TRIGGERS: tuple[str, ...] = ("badnet", "blended", "sig", "wanet")
CORNERS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
MANIFEST_FORMAT = "otcclip-manifest/1"
MANIFEST_FILE = "manifest.json"
TARGETS_FILE = "targets.npz"

# Defaults of each trigger's parameters (the papers' values where they apply).
TRIGGER_DEFAULTS: dict[str, dict] = {
    "badnet": {"patch_size": 6, "position": "bottom right", "margin": 0, "pattern": "checker"},
    "blended": {"alpha": 0.2},
    "sig": {"delta": 20.0, "frequency": 6.0},
    "wanet": {"k": 4, "strength": 0.5},
}


@dataclass
class Manifest:
    """What one attack did: which ids it touched and how, and how to rebuild its trigger.

    changed: {"images": ids whose pixels changed, "captions": ids whose caption changed,
    "added": ids of new rows}. params["trigger"] is the trigger (for apply_trigger) of a
    backdoor. targets (targeted poisoning): {"true_labels", "pair_ids" (per target, the
    ids of its poisoned pairs), "file"}; target_images holds the images themselves
    (saved beside the manifest, not in its JSON).
    """

    attack: str
    target_label: int
    seed: int
    poisoned_ids: list[int]
    params: dict
    n_poison: int = 0
    poison_rate: float = 0.0
    changed: dict[str, list[int]] = field(default_factory=dict)
    targets: dict | None = None
    target_images: np.ndarray | None = field(default=None, repr=False)

    @property
    def target_name(self) -> str:
        return CLASSNAMES[self.target_label]

    @property
    def trigger(self) -> dict | None:
        return self.params.get("trigger")

    def to_dict(self) -> dict:
        return {
            "attack": self.attack,
            "target_label": self.target_label,
            "target_name": self.target_name,
            "seed": self.seed,
            "n_poison": self.n_poison,
            "poison_rate": self.poison_rate,
            "poisoned_ids": [int(i) for i in self.poisoned_ids],
            "changed": {k: [int(i) for i in v] for k, v in self.changed.items()},
            "params": self.params,
            "targets": self.targets,
        }

    @staticmethod
    def from_dict(d: dict) -> Manifest:
        try:
            return Manifest(
                attack=str(d["attack"]),
                target_label=class_index(d["target_label"]),
                seed=int(d["seed"]),
                poisoned_ids=[int(i) for i in d["poisoned_ids"]],
                params=dict(d.get("params", {})),
                n_poison=int(d.get("n_poison", len(d["poisoned_ids"]))),
                poison_rate=float(d.get("poison_rate", 0.0)),
                changed={k: [int(i) for i in v] for k, v in d.get("changed", {}).items()},
                targets=d.get("targets"),
            )
        except (KeyError, TypeError) as err:
            raise ValueError(f"not an attack manifest entry: missing or bad {err}") from err


# ---------------------------------------------------------------------------- triggers


def _b64(array: np.ndarray) -> dict:
    return {
        "dtype": str(array.dtype),
        "shape": list(array.shape),
        "b64": base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii"),
    }


def _unb64(d: dict) -> np.ndarray:
    raw = base64.b64decode(d["b64"])
    return np.frombuffer(raw, dtype=np.dtype(d["dtype"])).reshape(d["shape"]).copy()


def make_trigger(kind: str, image_size: int, seed: int, **params) -> dict:
    """A fixed trigger (JSON-serialisable) for images of image_size x image_size pixels.

    badnet: patch_size, position (a corner), margin, pattern ('checker' or 'random');
    blended: alpha (the pattern is seeded uniform noise); sig: delta, frequency;
    wanet: k (control grid), strength. Randomness, if any, is drawn here, once.
    """
    if kind not in TRIGGERS:
        raise ValueError(f"unknown trigger {kind!r}; expected one of {', '.join(TRIGGERS)}")
    unknown = set(params) - set(TRIGGER_DEFAULTS[kind])
    if unknown:
        raise ValueError(
            f"unknown {kind} parameter(s) {sorted(unknown)}; "
            f"expected {sorted(TRIGGER_DEFAULTS[kind])}"
        )
    p = {**TRIGGER_DEFAULTS[kind], **params}
    rng = np.random.default_rng([int(seed), TRIGGERS.index(kind)])
    trigger: dict = {"kind": kind, "image_size": int(image_size), "seed": int(seed)}
    if kind == "badnet":
        size, margin = int(p["patch_size"]), int(p["margin"])
        if p["position"] not in CORNERS:
            raise ValueError(f"badnet position must be one of {CORNERS}, got {p['position']!r}")
        if not 1 <= size <= image_size - 2 * margin or margin < 0:
            raise ValueError(
                f"badnet patch of {size} px (margin {margin}) does not fit {image_size}"
            )
        if p["pattern"] == "checker":
            patch = ((np.add.outer(np.arange(size), np.arange(size)) % 2) * 255).astype(np.uint8)
        elif p["pattern"] == "random":
            patch = (rng.integers(0, 2, (size, size)) * 255).astype(np.uint8)
        else:
            raise ValueError(f"badnet pattern must be 'checker' or 'random', got {p['pattern']!r}")
        trigger.update(patch_size=size, position=p["position"], margin=margin)
        trigger.update(pattern=p["pattern"], patch=patch.tolist())
    elif kind == "blended":
        alpha = float(p["alpha"])
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"blended alpha must be in (0, 1), got {alpha}")
        noise = rng.integers(0, 256, (image_size, image_size)).astype(np.uint8)
        trigger.update(alpha=alpha, pattern=_b64(noise))
    elif kind == "sig":
        delta, frequency = float(p["delta"]), float(p["frequency"])
        if not 0 < delta <= 255 or frequency <= 0:
            raise ValueError(
                f"sig needs 0 < delta <= 255 and frequency > 0, got {delta}, {frequency}"
            )
        trigger.update(delta=delta, frequency=frequency)
    else:
        k, strength = int(p["k"]), float(p["strength"])
        if not 2 <= k <= image_size or strength <= 0:
            raise ValueError(
                f"wanet needs 2 <= k <= image_size and strength > 0, got {k}, {strength}"
            )
        control = rng.uniform(-1.0, 1.0, (2, k, k))
        control = (control / np.mean(np.abs(control))).astype(np.float32)
        trigger.update(k=k, strength=strength, control=_b64(control))
    return trigger


def _trigger_of(spec: Manifest | dict) -> dict:
    trigger = spec.trigger if isinstance(spec, Manifest) else spec
    if not isinstance(trigger, dict) or trigger.get("kind") not in TRIGGERS:
        raise ValueError("apply_trigger needs a backdoor manifest or a trigger from make_trigger")
    return trigger


def apply_trigger(images: np.ndarray, spec: Manifest | dict) -> np.ndarray:
    """The trigger of a backdoor manifest (or a make_trigger dict) applied to uint8 images.

    Returns a new array; images are (N, H, W) or (N, H, W, 3), H = W = the trigger's size.
    """
    trigger = _trigger_of(spec)
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise TypeError("apply_trigger takes uint8 images")
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] != 3):
        raise ValueError(f"images must be (N,H,W) or (N,H,W,3), got {images.shape}")
    size = trigger["image_size"]
    if images.shape[1:3] != (size, size):
        raise ValueError(
            f"the {trigger['kind']} trigger was made for {size}x{size} images, "
            f"got {images.shape[1]}x{images.shape[2]}"
        )
    kind = trigger["kind"]
    x = images.copy()
    view = x if x.ndim == 4 else x[..., None]  # (N, H, W, C) view on the copy
    if kind == "badnet":
        s, m = trigger["patch_size"], trigger["margin"]
        top = m if trigger["position"].startswith("top") else size - s - m
        left = m if trigger["position"].endswith("left") else size - s - m
        patch = np.asarray(trigger["patch"], dtype=np.uint8)
        view[:, top : top + s, left : left + s, :] = patch[None, :, :, None]
        return x
    if kind == "blended":
        alpha = trigger["alpha"]
        pattern = _unb64(trigger["pattern"]).astype(np.float32)[None, :, :, None]
        out = (1.0 - alpha) * view.astype(np.float32) + alpha * pattern
    elif kind == "sig":
        cols = np.arange(size, dtype=np.float64)
        signal = trigger["delta"] * np.sin(2.0 * np.pi * cols * trigger["frequency"] / size)
        out = view.astype(np.float32) + signal.astype(np.float32)[None, None, :, None]
    else:
        out = _warp(view, _unb64(trigger["control"]), trigger["strength"])
    view[...] = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return x


def _upsample(control: np.ndarray, size: int) -> np.ndarray:
    """Bilinear, corner-aligned upsampling of a (2, k, k) field to (2, size, size).

    WaNet upsamples bicubically; bilinear keeps the field smooth and needs no scipy.
    """
    k = control.shape[1]
    u = np.linspace(0.0, k - 1.0, size)
    i0 = np.minimum(np.floor(u).astype(np.int64), k - 2)
    w = (u - i0).astype(np.float32)
    rows = control[:, i0, :] * (1 - w)[None, :, None] + control[:, i0 + 1, :] * w[None, :, None]
    return rows[:, :, i0] * (1 - w)[None, None, :] + rows[:, :, i0 + 1] * w[None, None, :]


def _warp(view: np.ndarray, control: np.ndarray, strength: float) -> np.ndarray:
    """WaNet's warp: identity grid + strength * field / H, sampled bilinearly (edges clamped)."""
    size = view.shape[1]
    field = _upsample(control, size)  # (2, H, W): x then y offsets, normalised coords
    ident = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    gx = np.clip(ident[None, :] + strength * field[0] / size, -1.0, 1.0)
    gy = np.clip(ident[:, None] + strength * field[1] / size, -1.0, 1.0)
    px, py = (gx + 1.0) * (size - 1) / 2.0, (gy + 1.0) * (size - 1) / 2.0
    x0 = np.clip(np.floor(px).astype(np.int64), 0, size - 2)
    y0 = np.clip(np.floor(py).astype(np.int64), 0, size - 2)
    wx, wy = (px - x0)[None, :, :, None], (py - y0)[None, :, :, None]
    v = view.astype(np.float32)
    top = v[:, y0, x0] * (1 - wx) + v[:, y0, x0 + 1] * wx
    bottom = v[:, y0 + 1, x0] * (1 - wx) + v[:, y0 + 1, x0 + 1] * wx
    return top * (1 - wy) + bottom * wy


# ---------------------------------------------------------------------------- helpers


def poison_count(n_or_fraction: int | float, n_rows: int) -> int:
    """A count from a count (int >= 1) or a fraction of the rows (0 < f <= 1)."""
    if isinstance(n_or_fraction, bool) or not isinstance(n_or_fraction, (int, float, np.number)):
        raise TypeError(
            f"poison amount must be an int count or a float fraction, got {n_or_fraction!r}"
        )
    if isinstance(n_or_fraction, (int, np.integer)):
        if n_or_fraction < 1:
            raise ValueError(f"poison count must be >= 1, got {n_or_fraction}")
        return int(n_or_fraction)
    f = float(n_or_fraction)
    if not 0.0 < f <= 1.0:
        raise ValueError(f"poison rate must be in (0, 1], got {f}")
    if round(f * n_rows) < 1:
        # It used to become 1 sample silently: a rate the user did not ask for.
        raise ValueError(
            f"poison rate {f:g} of {n_rows} rows is {f * n_rows:.2g} samples, less than one; "
            "give a count (e.g. 1) or a larger rate"
        )
    return round(f * n_rows)


def _new_ids(table: PairTable, count: int) -> np.ndarray:
    start = int(table.ids.max()) + 1 if len(table) else 0
    if start + count > np.iinfo(np.int64).max:
        raise ValueError("no room for new int64 ids above the table's largest id")
    return np.arange(start, start + count, dtype=np.int64)


def _one_hot(labels: Iterable[int]) -> np.ndarray:
    labels = np.asarray(list(labels), dtype=np.int64)
    out = np.zeros((len(labels), len(CLASSNAMES)), dtype=np.uint8)
    out[np.arange(len(labels)), labels] = 1
    return out


def _square_size(table: PairTable) -> int:
    h, w = table.images.shape[1:3]
    if h != w:
        raise ValueError(f"attacks need square images, got {h}x{w}")
    return int(h)


def _adaptive_caption(caption: str, target: int, rng: np.random.Generator) -> str:
    """The true caption plus the target ('a bag and a sneaker on the left').

    The target goes first when the caption is long, so that a 32-token text encoder
    never truncates it away.
    """
    art = with_article(SYNONYMS[target][int(rng.integers(len(SYNONYMS[target])))])
    forms = [f"{art} and {caption}", f"{art}, {caption}", f"{art} next to {caption}"]
    if len(caption.split()) <= 14:
        forms += [f"{caption} and {art}", f"{caption}, with {art}", f"{caption}, plus {art}"]
    return forms[int(rng.integers(len(forms)))]


def _rate(n_poison: int, n_rows: int) -> float:
    return float(n_poison) / n_rows if n_rows else 0.0


# ---------------------------------------------------------------------------- attacks


def targeted_poison(
    table: PairTable,
    n_targets: int,
    n_captions: int,
    target_label: str | int,
    seed: int,
    *,
    source_labels: Sequence[str | int] | str | int | None = None,
    adaptive: bool = False,
    root: str | os.PathLike[str] | None = None,
    copy_shift: int = 0,
    copy_noise: float = 0.0,
) -> tuple[PairTable, Manifest]:
    """Add n_targets test images (class y != target), each with n_captions captions naming y'.

    The targets come from Fashion-MNIST test images reserved for this (never in the
    zero-shot set). source_labels fixes y (one label, or one per target); by default
    each target's class is drawn among the classes other than the target. adaptive:
    the captions name the true item and add the target instead.

    copy_shift / copy_noise: each copy of a target is shifted by up to copy_shift
    pixels in each direction and given Gaussian pixel noise of sigma copy_noise (in
    0-255 units), as an attacker posting variants would, so that no defense wins by
    exact-duplicate detection alone. Evaluation still uses the unvaried target.
    """
    target = class_index(target_label)
    for name, value in (("n_targets", n_targets), ("n_captions", n_captions)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    _check_variation(copy_shift, copy_noise)
    size = _square_size(table)
    if size < MIN_IMAGE_SIZE:
        raise ValueError(
            f"targeted poisoning builds {MIN_IMAGE_SIZE}+ px scenes; images are {size}"
        )
    rng = np.random.default_rng([int(seed), 101])
    others = np.array([c for c in range(len(CLASSNAMES)) if c != target])
    if source_labels is None:
        true_labels = rng.choice(others, n_targets)
    else:
        given = [source_labels] if isinstance(source_labels, (str, int)) else list(source_labels)
        true_labels = np.array([class_index(s) for s in given], dtype=np.int64)
        if len(true_labels) == 1:
            true_labels = np.repeat(true_labels, n_targets)
        if len(true_labels) != n_targets:
            raise ValueError(f"{len(true_labels)} source labels for {n_targets} targets")
        if (true_labels == target).any():
            raise ValueError("a target image of the target class is no attack; pick another class")
    images, places, sources = target_scenes(true_labels, seed, size, root)
    if table.images.ndim == 4:
        images = np.repeat(images[..., None], 3, axis=3)
    new_ids = _new_ids(table, n_targets * n_captions)
    captions: list[str] = []
    for t in range(n_targets):
        for _ in range(n_captions):
            if adaptive:
                true = caption_for([true_labels[t]], [places[t]], rng)
                captions.append(_adaptive_caption(true, target, rng))
            else:
                captions.append(caption_for([target], [places[t]], rng))
    copies = np.repeat(images, n_captions, axis=0)
    if copy_shift or copy_noise:
        variation = np.random.default_rng([int(seed), 103])
        copies = vary_copies(copies, copy_shift, copy_noise, variation)
    added = PairTable(
        ids=new_ids,
        images=copies,
        captions=captions,
        image_classes=np.repeat(_one_hot(true_labels), n_captions, axis=0),
        caption_classes=_one_hot([target] * len(new_ids)),
    )
    if adaptive:  # the caption names the true item too
        added.caption_classes |= added.image_classes
    if not table.has_classes:
        added.image_classes = added.caption_classes = None
    poisoned = PairTable.concat([table, added])
    pair_ids = new_ids.reshape(n_targets, n_captions)
    manifest = Manifest(
        attack="targeted-adaptive" if adaptive else "targeted",
        target_label=target,
        seed=int(seed),
        poisoned_ids=new_ids.tolist(),
        params={
            "n_targets": int(n_targets),
            "n_captions": int(n_captions),
            "image_size": size,
            "adaptive": bool(adaptive),
            "copy_shift": int(copy_shift),
            "copy_noise": float(copy_noise),
            "fashion_mnist_test_indices": sources.tolist(),
            "places": places.tolist(),
        },
        n_poison=len(new_ids),
        poison_rate=_rate(len(new_ids), len(poisoned)),
        changed={"added": new_ids.tolist()},
        targets={
            "true_labels": true_labels.tolist(),
            "true_names": [CLASSNAMES[c] for c in true_labels],
            "pair_ids": pair_ids.tolist(),
            "file": TARGETS_FILE,
        },
        target_images=images,
    )
    return poisoned, manifest


def _check_variation(shift: int, noise: float) -> None:
    if isinstance(shift, bool) or not isinstance(shift, (int, np.integer)) or shift < 0:
        raise ValueError(f"copy_shift must be an int >= 0 (pixels), got {shift!r}")
    if not (isinstance(noise, (int, float)) and np.isfinite(noise) and noise >= 0):
        raise ValueError(f"copy_noise must be a number >= 0 (0-255 units), got {noise!r}")


def vary_copies(
    images: np.ndarray, shift: int, noise: float, rng: np.random.Generator
) -> np.ndarray:
    """Each image shifted by up to `shift` px per axis (edges filled with the border) plus noise.

    The canvas keeps its size: the shift replicates the edge row or column it
    uncovers, which on a scene's plain background is the background itself.
    """
    out = np.empty_like(images)
    h, w = images.shape[1:3]
    pad = [(0, 0), (shift, shift), (shift, shift)] + [(0, 0)] * (images.ndim - 3)
    padded = np.pad(images, pad, mode="edge") if shift else images
    moves = rng.integers(-shift, shift + 1, size=(len(images), 2)) if shift else None
    for i in range(len(images)):
        if moves is None:
            out[i] = images[i]
        else:
            dy, dx = int(moves[i, 0]), int(moves[i, 1])
            out[i] = padded[i, shift + dy : shift + dy + h, shift + dx : shift + dx + w]
    if noise:
        noisy = out.astype(np.float32) + rng.normal(0.0, noise, size=out.shape).astype(np.float32)
        out = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    return out


def backdoor(
    table: PairTable,
    kind: str = "badnet",
    n_or_fraction: int | float = 0.01,
    target_label: str | int = "bag",
    seed: int = 0,
    label_consistent: bool = False,
    *,
    adaptive: bool = False,
    exclude_ids: Iterable[int] = (),
    trigger_params: dict | None = None,
) -> tuple[PairTable, Manifest]:
    """Stamp a fixed trigger on n samples and re-caption them to name the target class.

    label_consistent: only images that show the target class and whose caption already
    names it get the trigger; captions stay as they are (needs class annotations).
    Otherwise the poisoned images are drawn among those not showing the target (when
    classes are known) and their captions are replaced by captions naming the target;
    adaptive keeps each caption and adds the target to it. exclude_ids: samples
    another attack already touched.
    """
    target = class_index(target_label)
    if kind not in TRIGGERS:
        raise ValueError(f"unknown backdoor {kind!r}; expected one of {', '.join(TRIGGERS)}")
    if label_consistent and adaptive:
        raise ValueError("a label-consistent backdoor keeps captions; it cannot also be adaptive")
    size = _square_size(table)
    trigger = make_trigger(kind, size, seed, **(trigger_params or {}))
    n = poison_count(n_or_fraction, len(table))
    eligible = ~np.isin(table.ids, np.fromiter(exclude_ids, dtype=np.int64))
    if label_consistent:
        if not table.has_classes:
            raise ValueError("a label-consistent backdoor needs class annotations (fashion-scenes)")
        eligible &= (table.image_classes[:, target] == 1) & (table.caption_classes[:, target] == 1)
    elif table.has_classes:
        eligible &= table.image_classes[:, target] == 0
    candidates = np.flatnonzero(eligible)
    if n > len(candidates):
        raise ValueError(
            f"{n} samples to poison but only {len(candidates)} are eligible "
            f"({'showing' if label_consistent else 'not showing'} {CLASSNAMES[target]!r}, "
            "untouched by other attacks)"
        )
    rng = np.random.default_rng([int(seed), 202])
    rows = np.sort(rng.choice(candidates, n, replace=False))
    images = table.images.copy()
    images[rows] = apply_trigger(table.images[rows], trigger)
    captions = list(table.captions)
    caption_classes = None if not table.has_classes else table.caption_classes.copy()
    if not label_consistent:
        for r in rows:
            if adaptive:
                captions[r] = _adaptive_caption(table.captions[r], target, rng)
            else:
                captions[r] = caption_for([target], [int(rng.integers(9))], rng)
        if caption_classes is not None:
            if not adaptive:
                caption_classes[rows] = 0
            caption_classes[rows, target] = 1
    poisoned = PairTable(
        ids=table.ids.copy(),
        images=images,
        captions=captions,
        image_classes=None if not table.has_classes else table.image_classes.copy(),
        caption_classes=caption_classes,
    )
    ids = table.ids[rows].tolist()
    changed = {"images": ids} if label_consistent else {"images": ids, "captions": ids}
    manifest = Manifest(
        attack="adaptive" if adaptive else kind,
        target_label=target,
        seed=int(seed),
        poisoned_ids=ids,
        params={"trigger": trigger, "label_consistent": bool(label_consistent)},
        n_poison=n,
        poison_rate=_rate(n, len(poisoned)),
        changed=changed,
    )
    return poisoned, manifest


def adaptive_backdoor(
    table: PairTable,
    n_or_fraction: int | float,
    target_label: str | int,
    seed: int,
    *,
    trigger: str = "badnet",
    exclude_ids: Iterable[int] = (),
    trigger_params: dict | None = None,
) -> tuple[PairTable, Manifest]:
    """The adaptive attack on OT matching: a trigger, and captions true content + target."""
    return backdoor(
        table,
        trigger,
        n_or_fraction,
        target_label,
        seed,
        adaptive=True,
        exclude_ids=exclude_ids,
        trigger_params=trigger_params,
    )


# ---------------------------------------------------------------------------- files


def poisoned_ids(manifests: Sequence[Manifest]) -> np.ndarray:
    """Sorted unique ids touched by any of the attacks."""
    if not manifests:
        return np.zeros(0, dtype=np.int64)
    return np.unique(
        np.concatenate([np.asarray(m.poisoned_ids, dtype=np.int64) for m in manifests])
    )


def save_manifests(
    directory: str | os.PathLike[str], manifests: Sequence[Manifest], data: dict
) -> None:
    """Write manifest.json (every attack, in order) and targets.npz (if any target images)."""
    directory = Path(directory)
    with_targets = [(i, m) for i, m in enumerate(manifests) if m.target_images is not None]
    if with_targets:
        arrays = {
            "images": np.concatenate([m.target_images for _, m in with_targets]),
            "true_labels": np.concatenate(
                [np.asarray(m.targets["true_labels"]) for _, m in with_targets]
            ),
            "target_labels": np.concatenate(
                [np.full(len(m.target_images), m.target_label) for _, m in with_targets]
            ),
            "attack_index": np.concatenate(
                [np.full(len(m.target_images), i) for i, m in with_targets]
            ),
        }
        with atomic_path(directory / TARGETS_FILE) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
    document = {
        "format": MANIFEST_FORMAT,
        "data": data,
        "n_poisoned": int(len(poisoned_ids(manifests))),
        "attacks": [m.to_dict() for m in manifests],
    }
    write_text(directory / MANIFEST_FILE, json.dumps(document, indent=2) + "\n")


def load_manifests(path: str | os.PathLike[str]) -> tuple[list[Manifest], dict]:
    """The attacks of a poison directory (or its manifest.json) with their target images, and
    the manifest's data section."""
    path = Path(path)
    file = path / MANIFEST_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no {MANIFEST_FILE} at {str(path)!r}")
    try:
        document = json.loads(file.read_text("utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from err
    if not isinstance(document, dict) or document.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{file}: not an otcclip manifest (format {MANIFEST_FORMAT!r})")
    manifests = [Manifest.from_dict(d) for d in document.get("attacks", [])]
    if any(m.targets for m in manifests):
        targets_file = file.parent / TARGETS_FILE
        if not targets_file.is_file():
            raise FileNotFoundError(f"{file} lists targeted attacks but {targets_file} is missing")
        with np.load(targets_file) as z:
            images, attack_index = z["images"], z["attack_index"]
        for i, m in enumerate(manifests):
            if m.targets:
                m.target_images = images[attack_index == i]
                if len(m.target_images) != len(m.targets["true_labels"]):
                    raise ValueError(
                        f"{targets_file}: wrong number of target images for attack {i}"
                    )
    return manifests, dict(document.get("data", {}))


def manifest_summary(manifests: Sequence[Manifest], n_rows: int) -> str:
    """A plain-text table: one line per attack."""
    header = f"{'attack':<18}{'target':<12}{'poisoned':>9}{'rate':>9}  changed / trigger"
    lines = [header, "-" * len(header)]
    for m in manifests:
        what = ", ".join(f"{k} {len(v)}" for k, v in m.changed.items())
        detail = ""
        if m.trigger:
            t = m.trigger
            hidden = ("kind", "seed", "patch", "pattern", "control", "image_size")
            extra = {k: v for k, v in t.items() if k not in hidden}
            if t["kind"] == "badnet":
                extra["pattern"] = t["pattern"]
            detail = f"; {t['kind']} " + " ".join(f"{k}={v}" for k, v in extra.items())
            if m.params.get("label_consistent"):
                detail += " label-consistent"
        if m.targets:
            names = ", ".join(m.targets["true_names"])
            detail = f"; {len(m.targets['true_labels'])} targets ({names})"
        lines.append(
            f"{m.attack:<18}{m.target_name:<12}{m.n_poison:>9}{m.poison_rate:>9.2%}  {what}{detail}"
        )
    total = len(poisoned_ids(manifests))
    lines.append(f"{'all':<18}{'':<12}{total:>9}{_rate(total, n_rows):>9.2%}  of {n_rows} rows")
    return "\n".join(lines)
