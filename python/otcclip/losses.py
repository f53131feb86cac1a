"""The training losses: CLIP InfoNCE and the optimal-transport InfoNCE (L_inter, L_intra).

Every loss here is written for data parallelism without redundant work: it
receives the features of the whole (global) batch and `rows`, the slice of the
batch this process owns, and returns the sum of its rows' terms divided by the
number of participating rows in the *whole* batch. Summing the returned value
over processes gives the usual batch mean; in one process `rows=None` gives it
directly. The trainer gathers features with gradients, so the gradient is the
one a single process would compute on the same global batch.

Pairs that must not be contrasted are described by `valid` (rows and columns
that take part, e.g. SafeCLIP's safe set) and `ids` (two columns with the same
id hold the same caption after a many-to-one reassignment, so neither may serve
as the other's negative).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "clip_loss",
    "hardest_negatives",
    "ot_info_nce",
    "row_indices",
]


def row_indices(rows: slice | None, batch: int, device: torch.device) -> Tensor:
    """The global positions of the owned rows, as a LongTensor."""
    if rows is None:
        return torch.arange(batch, device=device)
    start, stop, step = rows.indices(batch)
    if step != 1:
        raise ValueError(f"rows must be a contiguous slice, got step {step}")
    return torch.arange(start, stop, device=device)


def clip_loss(
    image: Tensor,
    text: Tensor,
    logit_scale: Tensor | float,
    *,
    rows: slice | None = None,
    valid: Tensor | None = None,
    ids: Tensor | None = None,
) -> Tensor:
    """Symmetric InfoNCE of CLIP (open_clip's ClipLoss) on L2-normalised globals.

    `image` and `text` are (B, D) (normalised here), `logit_scale` the multiplier
    (the exponentiated learnable scale, as open_clip's forward returns it).
    Also serves SafeCLIP's unimodal losses: pass two views of one modality.
    Returns (sum over owned valid rows of (CE_i2t + CE_t2i) / 2) / (valid rows in B).
    """
    _check_pair(image, text, "image", "text")
    batch = image.shape[0]
    device = image.device
    own = row_indices(rows, batch, device)
    image = F.normalize(image.float(), dim=-1)
    text = F.normalize(text.float(), dim=-1)
    col_ok = _column_mask(batch, valid, device)
    n_valid = int(col_ok.sum())
    own = own[col_ok[own]]
    if own.numel() == 0:
        return (image.sum() + text.sum()) * 0.0
    blocked = _blocked(own, batch, col_ok, ids)  # (R, B): True = not a candidate
    scale = torch.as_tensor(logit_scale, device=device).float()
    i2t = (scale * image[own] @ text.T).masked_fill(blocked, float("-inf"))
    t2i = (scale * text[own] @ image.T).masked_fill(blocked, float("-inf"))
    per_row = F.cross_entropy(i2t, own, reduction="sum") + F.cross_entropy(
        t2i, own, reduction="sum"
    )
    return 0.5 * per_row / n_valid


def hardest_negatives(
    x_global: Tensor,
    y_global: Tensor,
    m: int,
    *,
    rows: slice | None = None,
    valid: Tensor | None = None,
    ids: Tensor | None = None,
    duplicate_cos: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Each owned row's positive and its m hardest negatives by global cosine.

    Returns `candidates` (R, 1 + m') LongTensor of column indices (column 0 is
    the positive, the row itself) and `available` (R, 1 + m') bool: False where
    a row had fewer than m' admissible negatives (the index there is filler).
    m' = min(m, B - 1): with m >= B - 1 every column is a candidate. Selection is
    not differentiated (it only chooses which OT problems to solve).
    `duplicate_cos`: columns whose y embedding has a cosine above this with the
    positive's are not negatives (see `ot_info_nce`).
    """
    _check_pair(x_global, y_global, "x_global", "y_global")
    _check_duplicate_cos(duplicate_cos)
    if m < 0:
        raise ValueError(f"m (number of OT negatives) must be >= 0, got {m}")
    batch = x_global.shape[0]
    device = x_global.device
    col_ok = _column_mask(batch, valid, device)
    own = row_indices(rows, batch, device)
    return _hardest(x_global, y_global, m, own[col_ok[own]], col_ok, ids, duplicate_cos)


def _hardest(
    x_global: Tensor,
    y_global: Tensor,
    m: int,
    own: Tensor,
    col_ok: Tensor,
    ids: Tensor | None,
    duplicate_cos: float | None = None,
) -> tuple[Tensor, Tensor]:
    batch = x_global.shape[0]
    device = x_global.device
    m_eff = min(m, batch - 1)
    positive = own.unsqueeze(1)
    if m_eff == 0:
        return positive, torch.ones_like(positive, dtype=torch.bool)
    with torch.no_grad():
        y = F.normalize(y_global.float(), dim=-1)
        sim = F.normalize(x_global[own].float(), dim=-1) @ y.T
        blocked = _blocked(own, batch, col_ok, ids)
        if duplicate_cos is not None:
            blocked |= (y[own] @ y.T) > duplicate_cos
        sim = sim.masked_fill(blocked, float("-inf"))
        sim[torch.arange(own.numel(), device=device), own] = float("-inf")
        top, neg = sim.topk(m_eff, dim=1)
    candidates = torch.cat([positive, neg], dim=1)
    available = torch.cat([torch.ones_like(positive, dtype=torch.bool), torch.isfinite(top)], dim=1)
    return candidates, available


def ot_info_nce(
    x_tokens: Tensor,
    y_tokens: Tensor,
    x_global: Tensor,
    y_global: Tensor,
    scale: Tensor | float,
    *,
    x_mask: Tensor | None = None,
    y_mask: Tensor | None = None,
    negatives: int = 7,
    eps: float = 0.1,
    iters: int = 20,
    rho: float | None = None,
    detach_plan: bool = True,
    symmetric: bool = False,
    rows: slice | None = None,
    valid: Tensor | None = None,
    ids: Tensor | None = None,
    duplicate_cos: float | None = None,
) -> Tensor:
    """InfoNCE whose logits are fine-grained OT similarities s_OT = 1 - D_OT.

    L_inter: x = patch tokens of the images, y = word tokens of their captions.
    L_intra: x, y = two augmented views of one modality. Each owned row i is
    contrasted against its positive (column i) and its `negatives` hardest
    columns by global cosine; all R*(1+m) transport problems go to
    `otcclip.ot.ot_similarity_candidates` in one batched call (the plan is detached by
    default: gradients flow through the cost only, which is cheaper and what
    the first probe used). `symmetric` adds the y -> x direction (twice the OT
    work). Returns the owned rows' sum over the valid rows of the batch.

    `duplicate_cos` drops near-duplicates of the positive from the negatives: a
    column whose y embedding has a cosine above it with the positive's. On
    templated captions a third of the "hardest negatives" say exactly what the
    positive says (other words, same content); as negatives they hold the loss
    at ln(1 + m) and teach the tokens nothing (benchmarks/TUNING.md).
    """
    _check_duplicate_cos(duplicate_cos)
    from otcclip.ot import ot_similarity_candidates

    if x_tokens.dim() != 3 or y_tokens.dim() != 3:
        raise ValueError(
            f"token sets must be (B, n, D); got {tuple(x_tokens.shape)} and {tuple(y_tokens.shape)}"
        )
    if x_tokens.shape[0] != x_global.shape[0] or y_tokens.shape[0] != y_global.shape[0]:
        raise ValueError("token sets and global embeddings must have the same batch size")
    batch = x_global.shape[0]
    device = x_global.device
    col_ok = _column_mask(batch, valid, device)
    n_valid = int(col_ok.sum())
    own = row_indices(rows, batch, device)
    own = own[col_ok[own]]
    if n_valid == 0 or own.numel() == 0:
        return (x_tokens.sum() + y_tokens.sum()) * 0.0
    directions = [(x_tokens, x_mask, x_global, y_tokens, y_mask, y_global)]
    if symmetric:
        directions.append((y_tokens, y_mask, y_global, x_tokens, x_mask, x_global))
    total = x_tokens.new_zeros((), dtype=torch.float32)
    for xt, xm, xg, yt, ym, yg in directions:
        cand, available = _hardest(xg, yg, negatives, own, col_ok, ids, duplicate_cos)
        sim = ot_similarity_candidates(
            xt[own],
            yt,
            cand,
            x_mask=None if xm is None else xm[own],
            y_mask=ym,
            eps=eps,
            iters=iters,
            rho=rho,
            detach_plan=detach_plan,
        )
        logits = torch.as_tensor(scale, dtype=torch.float32, device=device) * sim.float()
        logits = logits.masked_fill(~available, float("-inf"))
        total = total + (torch.logsumexp(logits, dim=1) - logits[:, 0]).sum()
    return total / (n_valid * len(directions))


def _check_pair(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(
            f"{name_a} and {name_b} must be (B, D); got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must have the same shape"
        )


def _check_duplicate_cos(value: float | None) -> None:
    if value is not None and not (isinstance(value, (int, float)) and -1.0 <= value <= 1.0):
        raise ValueError(f"duplicate_cos must be a cosine in [-1, 1] or None, got {value!r}")


def _column_mask(batch: int, valid: Tensor | None, device: torch.device) -> Tensor:
    if valid is None:
        return torch.ones(batch, dtype=torch.bool, device=device)
    if valid.shape != (batch,) or valid.dtype != torch.bool:
        raise ValueError(
            f"valid must be a bool tensor ({batch},), got {valid.dtype} {tuple(valid.shape)}"
        )
    return valid.to(device)


def _blocked(own: Tensor, batch: int, col_ok: Tensor, ids: Tensor | None) -> Tensor:
    """(R, B) True where column j may not appear in row i's softmax.

    Invalid columns, and columns holding the same caption id as row i's own
    (other than i itself): a duplicate of the positive is not a negative.
    """
    blocked = (~col_ok).unsqueeze(0).expand(own.numel(), batch).clone()
    if ids is not None:
        if ids.shape != (batch,):
            raise ValueError(f"ids must have shape ({batch},), got {tuple(ids.shape)}")
        same = ids[own].unsqueeze(1) == ids.unsqueeze(0)
        same[torch.arange(own.numel(), device=own.device), own] = False
        blocked |= same
    return blocked
