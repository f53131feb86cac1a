"""Batched entropic and unbalanced optimal transport between token sets (Sinkhorn in torch).

The fine-grained score of OTCCLIP compares an image's patch tokens with a caption's word
tokens through the cost of moving one set onto the other (DESIGN.md section 2). Thousands of
small problems (49 x 32 at the default sizes) are solved at once, so everything here is
batched over pairs and written so that the same code runs on the CPU and on CUDA.

Conventions
-----------
* Cost ``C = 1 - cos(x_p, y_w)``, in [0, 2].
* Marginals ``a`` (patches) and ``b`` (words) sum to one over the real (unmasked) entries;
  masked entries carry zero mass, so they get zero plan and never produce NaN, whatever the
  padding holds.
* Entropic OT: ``T* = argmin <T, C> + eps * KL(T | a b^T)`` over couplings of ``a`` and ``b``.
  With ``rho`` the marginal constraints are relaxed to ``rho * KL(T 1 | a) + rho * KL(T^T 1 | b)``
  (unbalanced OT, Chizat et al. 2018), so that a trigger patch or an injected word may stay
  unmatched; the scaling updates then carry the exponent ``rho / (rho + eps)``. These are the
  conventions of POT's ``ot.sinkhorn2`` and ``ot.unbalanced.sinkhorn_unbalanced2`` (``reg_type
  ="kl"``, ``returnCost="linear"``), which the tests compare against.
* ``D_OT = <T*, C>``, the transport cost of the plan (also when unbalanced); ``s_OT = 1 - D_OT``.
* A pair where one side has no real token has no transport: its plan is zero and ``D_OT = 1``
  (``s_OT = 0``, the score of orthogonal features), so an empty caption never looks similar.

Kernel or log domain (``domain="auto"``)
----------------------------------------
The kernel-domain iteration (``u = a / K v``, ``v = b / K^T u`` with ``K = exp(-C / eps)``) is
several times faster than the log-domain one (log-sum-exp), but ``exp(-C/eps)`` underflows when
the cost spread is large compared to eps (at eps = 0.01 in float32, ``exp(-2/0.01)`` is zero).
Costs are shifted per pair by their minimum over real entries (which does not change the plan),
so the kernel holds ``exp(-(C - min C)/eps)``; the rule is::

    kernel domain  iff  (max C - min C) / eps <= KERNEL_MAX_EXPONENT[dtype]   (per chunk of pairs)

with 40 for float32 (the kernel stays above 4e-18, and products of kernel and scalings far from
the float32 underflow at 1e-38) and 400 for float64. For the cosine cost (spread at most 2),
eps >= 0.05 always runs in the kernel domain in float32; eps = 0.01 runs there only when the
costs of every pair in the chunk lie within 0.4 of each other. ``domain="kernel"`` or ``"log"``
forces one.

Precision and speed
-------------------
Inputs may be float32, bfloat16 or float16; costs, kernels, scalings and sums are float32
(float64 inputs stay float64). Without gradients through the plan (no ``requires_grad``, or
``detach_plan``), pairs are processed in chunks (64 pairs per CPU thread) whose kernel, its
transpose and cost stay in the L2 cache through all iterations. Calls of at least
200,000 pair-iterations compile the iteration loop (blocks of 10 iterations, one fused pass
over the kernel per half-step) and the final ``<T, C>`` with ``torch.compile`` (inductor); the
first such call pays the compilation (seconds; inductor caches it on disk), a failed
compilation falls back to the eager loop (see ``set_compile``). With gradients through the
plan the iterations are plain differentiable torch ops (autograd unrolls them);
``detach_plan=True`` computes the plan without gradient and differentiates only ``<T*, C>``
through ``C``, the envelope-theorem gradient of the regularised OT cost, which is cheaper and
is what L_inter uses (DESIGN.md section 7). ``ot_similarity_candidates`` computes one image's
costs against its k candidates with one matrix product (the matching round's layout).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "KERNEL_MAX_EXPONENT",
    "cost_matrix",
    "ot_distance",
    "ot_similarity_candidates",
    "ot_similarity_matrix",
    "ot_similarity_pairs",
    "set_compile",
    "sinkhorn",
]

log = logging.getLogger(__name__)

KERNEL_MAX_EXPONENT: dict[torch.dtype, float] = {torch.float32: 40.0, torch.float64: 400.0}
"""Largest per-pair cost spread / eps for which the kernel domain is used (see module doc)."""

EMPTY_DISTANCE = 1.0
"""D_OT of a pair where one side has no real token."""

_DOMAINS = ("auto", "kernel", "log")
_COMPILE_MODES = ("auto", "on", "off")
# Below this many pair-iterations a call runs eagerly in "auto" mode: compiling costs seconds.
_COMPILE_MIN_WORK = 200_000
# Iterations fused into one compiled call; the loop calls it iters // _BLOCK times.
_BLOCK = 10
# Pairs per chunk and CPU thread of the no-gradient path: each thread's share of the kernel,
# its transpose and the cost (about 19 KB a pair at 49 x 32) stays in its L2 cache through
# all iterations.
_CPU_CHUNK = 64
_CUDA_CHUNK = 8192
# Materialise every intermediate vector: by default inductor recomputes b / s inside the next
# reduction, once per vector lane block, which costs more than the reduction itself (these
# options cost about 20 us a call, a few % of a block of 10 iterations on a full chunk).
_INDUCTOR_OPTIONS = {"realize_reads_threshold": 0}


# ----------------------------------------------------------------------------- public API


def _outside_autocast(fn: Callable) -> Callable:
    """Run an entry point in float32 even inside a mixed-precision (autocast) region.

    The trainer's bf16 autocast would turn the cost products into bf16, where
    exp(-C / eps) and the marginals lose the precision that Sinkhorn needs (and the
    kernel-domain test has no bf16 threshold). Gradients still reach bf16 inputs.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        active = [d for d in ("cuda", "cpu") if torch.is_autocast_enabled(d)]
        if not active:
            return fn(*args, **kwargs)
        with contextlib.ExitStack() as stack:
            for device_type in active:
                stack.enter_context(torch.autocast(device_type, enabled=False))
            return fn(*args, **kwargs)

    return wrapper


@_outside_autocast
def cost_matrix(x: Tensor, y: Tensor) -> Tensor:
    """Cosine cost ``1 - cos`` between the token sets of each pair: (B,P,D), (B,W,D) -> (B,P,W).

    float32 (float64 for float64 inputs) whatever the input dtype, so that half-precision
    features do not round the cost (a 0.004 error in C is a 8% error in exp(-C/0.05)).
    """
    _check_sets(x, y, same_batch=True)
    dtype = _compute_dtype(x, y)
    return _cosine_cost(x.to(dtype), y.to(dtype))


@_outside_autocast
def sinkhorn(
    cost: Tensor,
    a: Tensor,
    b: Tensor,
    *,
    eps: float = 0.05,
    iters: int = 50,
    tol: float | None = None,
    rho: float | None = None,
    domain: str = "auto",
) -> Tensor:
    """Entropic (or, with ``rho``, unbalanced) transport plans for given costs and marginals.

    cost (B,P,W); a (B,P) and b (B,W) non-negative weights, zero on entries that do not
    exist (they are renormalised to sum to one). Returns the plans (B,P,W), differentiable
    with respect to ``cost`` (and the weights) when they require grad.
    """
    if cost.dim() != 3:
        raise ValueError(f"cost must be (B, P, W), got shape {tuple(cost.shape)}")
    n, p, w = cost.shape
    params = _Params.make(eps, iters, tol, rho, domain)
    dtype = torch.float64 if cost.dtype == torch.float64 else torch.float32
    a = _weights(a, None, (n, p), "a", cost.device, dtype)
    b = _weights(b, None, (n, w), "b", cost.device, dtype)
    c = cost.to(dtype)
    if n == 0:
        return c.clone()
    plan, _ = _solve(c, a, b, params, need_plan=True, fast=not _grad_through(c, a, b))
    return plan


@_outside_autocast
def ot_distance(
    x: Tensor,
    y: Tensor,
    x_mask: Tensor | None = None,
    y_mask: Tensor | None = None,
    a: Tensor | None = None,
    b: Tensor | None = None,
    eps: float = 0.05,
    iters: int = 50,
    tol: float | None = None,
    rho: float | None = None,
    return_plan: bool = False,
    detach_plan: bool = False,
    *,
    domain: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """OT distance ``D_OT = <T*, C>`` between the token sets of each pair of a batch.

    x (B,P,D) and y (B,W,D) need not be normalised (the cost is 1 - cosine); masks are bool
    (B,P)/(B,W), True on real tokens; a (B,P) and b (B,W) are optional non-negative token
    weights (uniform over the real tokens by default), normalised over the mask. ``eps`` is
    the entropic regularisation, ``iters`` the number of Sinkhorn iterations (the maximum when
    ``tol`` is given: the loop stops once the L1 error of the column marginal, checked every
    10 iterations, is below ``tol`` for every pair of a chunk; for unbalanced OT the change of
    the column marginal over an iteration is used instead), ``rho`` the KL weight of the
    relaxed marginals (None: balanced). Returns D_OT (B,) in float32 (float64 for float64
    inputs), and the plans (B,P,W) when ``return_plan``. Gradients flow through the cost and
    the plan; ``detach_plan`` stops them through the plan (the returned plan has no grad).
    ``domain``: "auto" (see the module doc), "kernel" or "log". A pair with no real token (or
    zero total weight) on one side gets D_OT = 1 and a zero plan.
    """
    _check_sets(x, y, same_batch=True)
    params = _Params.make(eps, iters, tol, rho, domain)
    n, p, _ = x.shape
    w = y.shape[1]
    dtype = _compute_dtype(x, y)
    xm = _mask(x_mask, (n, p), "x_mask", x.device)
    ym = _mask(y_mask, (n, w), "y_mask", x.device)
    _check_finite(x, xm, "x")
    _check_finite(y, ym, "y")
    aw = _weights(a, xm, (n, p), "a", x.device, dtype)
    bw = _weights(b, ym, (n, w), "b", x.device, dtype)
    if n == 0:
        d = torch.zeros(0, dtype=dtype, device=x.device)
        return (d, torch.zeros((0, p, w), dtype=dtype, device=x.device)) if return_plan else d

    if _grad_through(x, y, aw, bw):
        c = _cosine_cost(x.to(dtype), y.to(dtype))
        if detach_plan:
            with torch.no_grad():
                plan, _ = _solve(c.detach(), aw.detach(), bw.detach(), params, True, fast=True)
            d = _transport_cost(plan, c, aw, bw)
        else:
            plan, d = _solve(c, aw, bw, params, need_plan=True, fast=False)
        return (d, plan) if return_plan else d

    d, plan = _aligned_no_grad(x, y, aw, bw, params, dtype, return_plan)
    return (d, plan) if return_plan else d


@_outside_autocast
def ot_similarity_matrix(
    x: Tensor,
    y: Tensor,
    x_mask: Tensor | None = None,
    y_mask: Tensor | None = None,
    **ot_kwargs,
) -> Tensor:
    """``s_OT = 1 - D_OT`` of every x_i against every y_j: (Bx,P,D), (By,W,D) -> (Bx,By).

    The logits of the OT-InfoNCE loss over a batch. Accepts the keyword arguments of
    ``ot_distance`` (eps, iters, tol, rho, detach_plan, domain, a, b with shapes (Bx,P),
    (By,W)). The costs of one x_i against all of y are one matrix product.
    """
    _check_sets(x, y, same_batch=False)
    bx, by = x.shape[0], y.shape[0]
    ix = torch.arange(bx, device=x.device).repeat_interleave(by)
    iy = torch.arange(by, device=x.device).repeat(bx)
    sim = _similarity(x, y, x_mask, y_mask, ix, iy, by, shared_y=True, ot_kwargs=ot_kwargs)
    return sim.view(bx, by)


@_outside_autocast
def ot_similarity_pairs(
    x: Tensor,
    y: Tensor,
    pairs: Tensor,
    x_mask: Tensor | None = None,
    y_mask: Tensor | None = None,
    **ot_kwargs,
) -> Tensor:
    """``s_OT`` of chosen pairs only: ``pairs`` (N,2) int rows (i, j) -> (N,) s_OT(x_i, y_j).

    For losses that score each image's positive and a few hard negatives instead of the whole
    batch. Keyword arguments as for ``ot_similarity_matrix``.
    """
    _check_sets(x, y, same_batch=False)
    if not isinstance(pairs, Tensor) or pairs.dim() != 2 or pairs.shape[1] != 2:
        raise ValueError(f"pairs must be an (N, 2) integer tensor, got {_describe(pairs)}")
    if pairs.dtype.is_floating_point or pairs.dtype == torch.bool:
        raise TypeError(f"pairs must hold integer indices, got {pairs.dtype}")
    pairs = pairs.to(device=x.device, dtype=torch.long)
    ix, iy = pairs[:, 0], pairs[:, 1]
    _check_index(ix, x.shape[0], "pairs[:, 0]")
    _check_index(iy, y.shape[0], "pairs[:, 1]")
    return _similarity(x, y, x_mask, y_mask, ix, iy, 1, shared_y=False, ot_kwargs=ot_kwargs)


@_outside_autocast
def ot_similarity_candidates(
    x: Tensor,
    y: Tensor,
    candidates: Tensor,
    x_mask: Tensor | None = None,
    y_mask: Tensor | None = None,
    **ot_kwargs,
) -> Tensor:
    """``s_OT`` of each x_i against its k candidates: ``candidates`` (Bx,k) into y -> (Bx,k).

    The scoring step of a matching round (each image against its top-k captions): the costs
    of one image against its k candidates are one matrix product. Keyword arguments as for
    ``ot_similarity_matrix``.
    """
    _check_sets(x, y, same_batch=False)
    if not isinstance(candidates, Tensor) or candidates.dim() != 2:
        raise ValueError(
            f"candidates must be a (Bx, k) integer tensor, got {_describe(candidates)}"
        )
    if candidates.shape[0] != x.shape[0]:
        raise ValueError(
            f"candidates has {candidates.shape[0]} rows but x holds {x.shape[0]} token sets"
        )
    if candidates.dtype.is_floating_point or candidates.dtype == torch.bool:
        raise TypeError(f"candidates must hold integer indices, got {candidates.dtype}")
    bx, k = candidates.shape
    iy = candidates.to(device=x.device, dtype=torch.long).reshape(-1)
    _check_index(iy, y.shape[0], "candidates")
    ix = torch.arange(bx, device=x.device).repeat_interleave(k)
    sim = _similarity(x, y, x_mask, y_mask, ix, iy, k, shared_y=False, ot_kwargs=ot_kwargs)
    return sim.view(bx, k)


def set_compile(mode: str) -> None:
    """Whether the no-gradient Sinkhorn loop is compiled with torch.compile.

    "auto" (default, or env OTCCLIP_OT_COMPILE): compile calls of at least 200,000
    pair-iterations, where the seconds of compilation pay off; "on": always; "off": never.
    A failed compilation logs a warning and falls back to eager for the rest of the process.
    """
    if mode not in _COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {_COMPILE_MODES}, got {mode!r}")
    _COMPILER.mode = mode


# ----------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class _Params:
    eps: float
    iters: int
    tol: float | None
    rho: float | None
    domain: str

    @property
    def fi(self) -> float:
        """Exponent of the scaling updates: 1 balanced, rho / (rho + eps) unbalanced."""
        return 1.0 if self.rho is None else self.rho / (self.rho + self.eps)

    @staticmethod
    def make(eps, iters, tol, rho, domain) -> _Params:
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < float("inf"):
            # eps = inf made every plan uniform: a distance that ignores the data.
            raise ValueError(f"eps must be a positive finite number, got {eps!r}")
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
            raise ValueError(f"iters must be a positive int, got {iters!r}")
        if tol is not None and (
            isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0
        ):
            raise ValueError(f"tol must be None or a non-negative number, got {tol!r}")
        if rho is not None and (
            isinstance(rho, bool) or not isinstance(rho, (int, float)) or not rho > 0
        ):
            raise ValueError(f"rho must be None or a positive number, got {rho!r}")
        if domain not in _DOMAINS:
            raise ValueError(f"domain must be one of {_DOMAINS}, got {domain!r}")
        return _Params(
            float(eps),
            iters,
            None if tol is None else float(tol),
            None if rho is None or rho == float("inf") else float(rho),
            domain,
        )


def _describe(t) -> str:
    if isinstance(t, Tensor):
        return f"a {t.dtype} tensor of shape {tuple(t.shape)}"
    return f"a {type(t).__name__}"


_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_sets(x, y, same_batch: bool) -> None:
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must be a (batch, tokens, dim) tensor, got {_describe(t)}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{name} must be float32, float64, bfloat16 or float16, got {t.dtype}")
        if t.shape[1] == 0:
            raise ValueError(f"{name} has no tokens (shape {tuple(t.shape)})")
    if x.shape[2] != y.shape[2]:
        raise ValueError(f"x and y must share the feature dim, got {x.shape[2]} and {y.shape[2]}")
    if same_batch and x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x and y must hold the same number of sets (one pair each), got {x.shape[0]} "
            f"and {y.shape[0]}; use ot_similarity_matrix for all pairs"
        )
    if x.device != y.device:
        raise ValueError(f"x and y must be on the same device, got {x.device} and {y.device}")


def _check_index(idx: Tensor, size: int, name: str) -> None:
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= size):
        raise ValueError(f"{name} holds indices outside [0, {size})")


def _compute_dtype(*ts: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _check_finite(t: Tensor, mask: Tensor | None, name: str) -> None:
    """Refuse NaN or inf in real tokens: the distance would be NaN, silently.

    Padding (tokens the mask marks False) may hold anything; it never gets mass.
    """
    bad = ~torch.isfinite(t).all(dim=-1)
    if mask is not None:
        bad &= mask
    if bool(bad.any()):
        i, j = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"{name} holds NaN or inf in {int(bad.sum())} real tokens (first: set {i}, token "
            f"{j}); the OT distance would be NaN"
        )


def _mask(mask, shape, name: str, device) -> Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a bool tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = real token), got {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    mask = mask.to(device)
    return None if bool(mask.all()) else mask


def _weights(w, mask: Tensor | None, shape, name: str, device, dtype) -> Tensor:
    """Marginal weights normalised to one over the real entries (zero rows stay zero).

    ``mask`` has been checked by _mask (None: every entry is real).
    """
    if w is None:
        w = torch.ones(shape, device=device, dtype=dtype)
    else:
        if not isinstance(w, Tensor):
            raise TypeError(f"{name} must be a tensor of weights, got {type(w).__name__}")
        if tuple(w.shape) != tuple(shape):
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(w.shape)}")
        w = w.to(device=device, dtype=dtype)
        bad = ~torch.isfinite(w) | (w < 0)
        if mask is not None:
            bad &= mask
        if bool(bad.any()):
            raise ValueError(f"{name} must hold finite non-negative weights")
    if mask is not None:
        w = w * mask
    total = w.sum(-1, keepdim=True)
    return w / torch.where(total > 0, total, torch.ones_like(total))


def _grad_through(*ts: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


# ----------------------------------------------------------------------------- costs


def _inv_norm(t: Tensor) -> Tensor:
    return torch.linalg.vector_norm(t, dim=-1).clamp_min(1e-12).reciprocal()


def _cosine_cost(x: Tensor, y: Tensor) -> Tensor:
    """1 - cos for each pair, differentiable; x, y already in the compute dtype."""
    s = torch.bmm(x, y.transpose(1, 2))
    return 1.0 - s * _inv_norm(x).unsqueeze(-1) * _inv_norm(y).unsqueeze(-2)


def _aligned_cost_chunk(x: Tensor, y: Tensor, dtype: torch.dtype) -> Tensor:
    """Costs of the pairs (x_i, y_i) of a chunk: one product, two norms, one scaling.

    (Products and norms a few pairs at a time, so that the norms read the tokens from cache,
    measured no faster on the CPU, and the many small parallel regions slow down badly when
    other processes share the cores.)
    """
    xs, ys = x.to(dtype), y.to(dtype)
    out = torch.bmm(xs, ys.transpose(1, 2))
    nx = torch.linalg.vector_norm(xs, dim=-1).clamp_min_(1e-12)
    ny = torch.linalg.vector_norm(ys, dim=-1).clamp_min_(1e-12)
    out.div_(nx.unsqueeze(-1)).div_(ny.unsqueeze(-2))
    return out.neg_().add_(1.0)


# ----------------------------------------------------------------------------- solver


def _solve(
    c: Tensor, a: Tensor, b: Tensor, params: _Params, need_plan: bool, fast: bool
) -> tuple[Tensor | None, Tensor]:
    """Plan (if asked) and transport cost of each pair, for costs c and normalised weights.

    ``fast``: no gradient needed, chunked (and maybe compiled); otherwise differentiable.
    """
    if not fast:
        return _solve_chunk(c, a, b, params, need_plan=True, how="grad")
    n = c.shape[0]
    chunk = _chunk_size(c.device)
    how = _COMPILER.how(n * params.iters)
    plans, ds = [], []
    for s in range(0, n, chunk):
        plan, d = _solve_chunk(
            c[s : s + chunk],
            a[s : s + chunk],
            b[s : s + chunk],
            params,
            need_plan,
            _tail_eager(how, min(n, s + chunk) - s, chunk),
        )
        ds.append(d)
        if need_plan:
            plans.append(plan)
    d = torch.cat(ds) if len(ds) > 1 else ds[0]
    plan = (torch.cat(plans) if len(plans) > 1 else plans[0]) if need_plan else None
    return plan, d


def _tail_eager(how: str, size: int, chunk: int) -> str:
    """A partial chunk runs eagerly: compiled code is specialised to the full chunk's shape,
    and every new shape would cost a compilation (and count towards dynamo's limit)."""
    return "eager" if how == "compiled" and size != chunk else how


def _chunk_size(device: torch.device) -> int:
    if device.type == "cpu":
        return _CPU_CHUNK * max(1, torch.get_num_threads())
    return _CUDA_CHUNK


def _solve_chunk(
    c: Tensor, a: Tensor, b: Tensor, params: _Params, need_plan: bool, how: str
) -> tuple[Tensor | None, Tensor]:
    """One chunk of pairs: empty pairs, masks, domain choice, iterations, plan and cost.

    ``how``: "grad" (differentiable ops), "eager" or "compiled" (no gradient needed; the
    iterations may run through torch.compile).
    """
    a_real, b_real = a > 0, b > 0
    empty = ~(a_real.any(-1) & b_real.any(-1))
    any_empty = bool(empty.any())
    if any_empty:  # solve a harmless stand-in problem, zeroed below
        e = empty.unsqueeze(-1)
        a = torch.where(e, torch.full_like(a, 1.0 / a.shape[-1]), a)
        b = torch.where(e, torch.full_like(b, 1.0 / b.shape[-1]), b)
        a_real, b_real = a > 0, b > 0
    compiled, fast = how == "compiled", how != "grad"
    stage = _COMPILER.stage if compiled else _eager_stage
    eps = params.eps
    kernel = None
    if params.domain != "log":
        cs, k, kt, cmin, spread = _kernel_prep(c, a_real, b_real, eps, fast, compiled)
        if (
            params.domain == "kernel"
            or float(spread.detach()) / eps <= KERNEL_MAX_EXPONENT[c.dtype]
        ):
            kernel = (k, kt, cmin)
    else:
        cs = _sanitize(c, a_real, b_real)
    if kernel is not None:
        k, kt, cmin = kernel
        u, v = _kernel_iterate(k, kt, cmin, a, b, params, compiled)
        if need_plan or any_empty:
            plan = u.unsqueeze(-1) * k * v.unsqueeze(-2)
        else:
            return None, stage(_kernel_cost, u, k, v, cs)
    else:
        plan = _log_plan(cs, a, b, params)
    if any_empty:
        plan = plan * (~empty).to(plan.dtype)[:, None, None]
    d = (plan * cs).sum((1, 2))
    if any_empty:
        d = torch.where(empty, torch.full_like(d, EMPTY_DISTANCE), d)
    return (plan if need_plan else None), d


def _sanitize(c: Tensor, a_real: Tensor, b_real: Tensor) -> Tensor:
    """Zero cost on entries without mass: padding may hold anything (even NaN)."""
    real = a_real.unsqueeze(-1) & b_real.unsqueeze(-2)
    return torch.where(real, c, torch.zeros((), dtype=c.dtype, device=c.device))


def _transport_cost(plan: Tensor, c: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """<T, C> with the conventions of _solve_chunk (empty pairs -> EMPTY_DISTANCE)."""
    d = (plan * _sanitize(c, a > 0, b > 0)).sum((1, 2))
    empty = ~((a > 0).any(-1) & (b > 0).any(-1))
    return torch.where(empty, torch.full_like(d, EMPTY_DISTANCE), d)


# ---- kernel domain
#
# The plan is T = diag(u) K diag(v) with K = exp(-(C - cmin) / eps) (cmin: per-pair minimum
# over real entries, which keeps K <= 1; entries without mass get K = 1, so that no row or
# column sum is zero). One iteration updates v then u:
#     v = b * (K^T u)^-fi ,   u = a * gamma * (K v)^-fi ,   gamma = exp(-(1 - fi) * cmin / eps)
# For balanced OT (fi = 1) this is plain Sinkhorn; for unbalanced OT gamma undoes the shift of
# the cost, to which the unbalanced plan is not invariant.


def _kernel_prep(c: Tensor, a_real: Tensor, b_real: Tensor, eps: float, fast: bool, with_kt: bool):
    """Sanitised cost, kernel (and K^T for the compiled iterations), per-pair minimum, spread.

    ``fast``: no gradient needed, in-place ops. (Eager on purpose: inductor's fused version of
    these few passes measured slower than ATen's.)
    """
    masked = not (bool(a_real.all()) and bool(b_real.all()))
    if masked:
        real = a_real.unsqueeze(-1) & b_real.unsqueeze(-2)
        inf = torch.full((), float("inf"), dtype=c.dtype, device=c.device)
        cs = torch.where(real, c, torch.zeros_like(inf))
        cmin = torch.where(real, c, inf).amin((1, 2), keepdim=True)
        cmax = torch.where(real, c, -inf).amax((1, 2), keepdim=True)
    else:
        cs = c
        cmin = c.amin((1, 2), keepdim=True)
        cmax = c.amax((1, 2), keepdim=True)
    if fast:
        k = torch.sub(cmin, cs).mul_(1.0 / eps)
        k = (k.clamp_max_(0.0) if masked else k).exp_()
    else:
        k = torch.exp((cmin - cs).clamp_max(0.0) / eps)
    kt = k.transpose(1, 2).contiguous() if with_kt else k
    return cs, k, kt, cmin, (cmax - cmin).amax()


def _kernel_cost(u: Tensor, k: Tensor, v: Tensor, c: Tensor) -> Tensor:
    """<T, C> without materialising T."""
    return (u.unsqueeze(-1) * k * v.unsqueeze(-2) * c).sum((1, 2))


def _kernel_iterate(
    k: Tensor, kt: Tensor, cmin: Tensor, a: Tensor, b: Tensor, params: _Params, compiled: bool
) -> tuple[Tensor, Tensor]:
    eps, fi = params.eps, params.fi
    au = a if fi == 1.0 else a * torch.exp(-(1.0 - fi) * cmin.view(-1, 1) / eps)
    if compiled:
        step = _COMPILER.block
    else:
        kt, step = None, _eager_block
    u, v = a.clone(), b  # a fresh u: an input aliasing another makes dynamo compile a slow variant
    done = 0
    while done < params.iters:
        n = min(_BLOCK, params.iters - done)
        # a short last block runs eagerly: one compiled variant per shape is enough
        u, v = (step if n == _BLOCK else _eager_block)(k, kt, au, b, u, n, fi)
        done += n
        if params.tol is not None and done < params.iters:
            with torch.no_grad():
                change = _kernel_marginal_change(k.detach(), u.detach(), v.detach(), b, fi)
            if float(change.max()) <= params.tol:
                break
    return u, v


def _kernel_step_bmm(k: Tensor, a: Tensor, b: Tensor, u: Tensor, fi: float):
    """One differentiable iteration; bmm keeps autograd's saved tensors to K and vectors."""
    s = torch.bmm(u.unsqueeze(1), k).squeeze(1)
    v = b / s if fi == 1.0 else b * s.pow(-fi)
    r = torch.bmm(k, v.unsqueeze(-1)).squeeze(-1)
    u = a / r if fi == 1.0 else a * r.pow(-fi)
    return u, v


def _kernel_block(k: Tensor, kt: Tensor, a: Tensor, b: Tensor, u: Tensor, n: int, fi: float):
    """n iterations as column reductions over K and K^T (vectorised over the contiguous axis).

    Written for inductor, which turns each half-step into one loop over the kernel.
    """
    v = b
    for _ in range(n):
        s = (k * u.unsqueeze(-1)).sum(1)
        v = b / s if fi == 1.0 else b * s.pow(-fi)
        r = (kt * v.unsqueeze(-1)).sum(1)
        u = a / r if fi == 1.0 else a * r.pow(-fi)
    return u, v


def _eager_block(k: Tensor, kt, a: Tensor, b: Tensor, u: Tensor, n: int, fi: float):
    """n iterations in eager mode (batched matrix-vector products are fastest there)."""
    v = b
    for _ in range(n):
        u, v = _kernel_step_bmm(k, a, b, u, fi)
    return u, v


def _kernel_marginal_change(k: Tensor, u: Tensor, v: Tensor, b: Tensor, fi: float) -> Tensor:
    """L1 change of the column marginal by the next v update (balanced: its L1 error)."""
    s = torch.bmm(u.unsqueeze(1), k).squeeze(1)
    v_next = b / s if fi == 1.0 else b * s.pow(-fi)
    return ((v_next - v) * s).abs().sum(-1)


# ---- log domain
#
# f = log u, g = log v, Ce = C / eps; one iteration:
#     g = log b - fi * LSE_i(f_i - Ce_ij) ,   f = log a - fi * LSE_j(g_j - Ce_ij)
# Entries without mass have log weight -inf, hence -inf potentials and zero plan; every pair
# has a real entry on each side (empty pairs were replaced), so no LSE is over -inf only.


def _log_plan(c: Tensor, a: Tensor, b: Tensor, params: _Params) -> Tensor:
    fi = params.fi
    ce = c / params.eps
    log_a, log_b = a.log(), b.log()
    f, g = log_a, log_b
    for it in range(params.iters):
        lse_col = torch.logsumexp(f.unsqueeze(-1) - ce, dim=1)
        g_new = log_b - fi * lse_col
        check = params.tol is not None and (it + 1) % _BLOCK == 0 and it + 1 < params.iters
        if check:
            with torch.no_grad():
                change = ((g_new + lse_col).exp() - (g + lse_col).exp()).abs().sum(-1)
        g = g_new
        f = log_a - fi * torch.logsumexp(g.unsqueeze(-2) - ce, dim=2)
        if check and float(change.max()) <= params.tol:
            break
    return torch.exp(f.unsqueeze(-1) + g.unsqueeze(-2) - ce)


# ----------------------------------------------------------------------------- no-grad paths


def _aligned_no_grad(x, y, aw, bw, params, dtype, return_plan):
    """ot_distance without gradients: costs and plans chunk by chunk, never all in memory."""
    n = x.shape[0]
    chunk = _chunk_size(x.device)
    how = _COMPILER.how(n * params.iters)
    ds, plans = [], []
    with torch.no_grad():
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            c = _aligned_cost_chunk(x[s:e], y[s:e], dtype)
            how_c = _tail_eager(how, e - s, chunk)
            plan, d = _solve_chunk(c, aw[s:e], bw[s:e], params, return_plan, how_c)
            ds.append(d)
            if return_plan:
                plans.append(plan)
    d = torch.cat(ds) if len(ds) > 1 else ds[0]
    plan = (torch.cat(plans) if len(plans) > 1 else plans[0]) if return_plan else None
    return d, plan


def _similarity(x, y, x_mask, y_mask, ix, iy, group: int, shared_y: bool, ot_kwargs: dict):
    """s_OT of the pairs (x[ix], y[iy]); pairs come in runs of ``group`` sharing one x.

    ``shared_y``: every run is all of y, in order (the all-pairs matrix).
    """
    allowed = {"a", "b", "eps", "iters", "tol", "rho", "detach_plan", "domain"}
    unknown = set(ot_kwargs) - allowed
    if unknown:
        raise TypeError(
            f"unexpected keyword arguments {sorted(unknown)}; allowed: {sorted(allowed)}"
        )
    params = _Params.make(
        ot_kwargs.get("eps", 0.05),
        ot_kwargs.get("iters", 50),
        ot_kwargs.get("tol"),
        ot_kwargs.get("rho"),
        ot_kwargs.get("domain", "auto"),
    )
    detach_plan = bool(ot_kwargs.get("detach_plan", False))
    bx, p, _ = x.shape
    by, w, _ = y.shape
    dtype = _compute_dtype(x, y)
    xm = _mask(x_mask, (bx, p), "x_mask", x.device)
    ym = _mask(y_mask, (by, w), "y_mask", x.device)
    aw = _weights(ot_kwargs.get("a"), xm, (bx, p), "a", x.device, dtype)
    bw = _weights(ot_kwargs.get("b"), ym, (by, w), "b", x.device, dtype)
    if ix.numel() == 0:
        return torch.empty(0, dtype=dtype, device=x.device)
    x, aw = _drop_massless_tokens(x, aw)
    y, bw = _drop_massless_tokens(y, bw)
    xc, yc = x.to(dtype), y.to(dtype)

    if _grad_through(xc, yc, aw, bw):
        xn = xc * _inv_norm(xc).unsqueeze(-1)
        yn = yc * _inv_norm(yc).unsqueeze(-1)
        c = 1.0 - _pair_products(xn, yn, ix, iy, group, shared_y)
        a_p, b_p = aw[ix], bw[iy]
        if detach_plan:
            with torch.no_grad():
                plan, _ = _solve(c.detach(), a_p.detach(), b_p.detach(), params, True, fast=True)
            d = _transport_cost(plan, c, a_p, b_p)
        else:
            _, d = _solve(c, a_p, b_p, params, need_plan=True, fast=False)
        return 1.0 - d

    with torch.no_grad():
        x_inv, y_inv = _inv_norm(xc), _inv_norm(yc)
        # whole runs per chunk, so that each x meets its run in one product
        per = max(1, _chunk_size(x.device) // group) * group
        how = _COMPILER.how(ix.numel() * params.iters)
        out = []
        for s in range(0, ix.numel(), per):
            jx, jy = ix[s : s + per], iy[s : s + per]
            if x.device.type == "cpu":
                prod = _pair_products_streamed(xc, yc, jx, jy, group, shared_y)
            else:
                prod = _pair_products(xc, yc, jx, jy, group, shared_y)
            c = prod.mul_(x_inv[jx].unsqueeze(-1)).mul_(y_inv[jy].unsqueeze(-2))
            c = torch.sub(1.0, c, out=c)
            _, d = _solve_chunk(c, aw[jx], bw[jy], params, False, _tail_eager(how, len(jx), per))
            out.append(d)
        return 1.0 - torch.cat(out)


def _drop_massless_tokens(t: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """The token positions that carry mass in some set of the call, and their weights.

    A position without mass in every set (the padding past the longest caption, a start
    token every mask leaves out) changes no plan and no distance: its column of the plan
    is zero, and the kernel's stand-in entries there never reach a row sum. Dropping it
    is exact and saves its share of every cost product and iteration: on templated
    captions padded to the context length, about a third of the work.
    """
    keep = (w > 0).any(0)
    if bool(keep.all()) or not bool(keep.any()):
        return t, w
    idx = keep.nonzero().squeeze(1)
    return t.index_select(1, idx), w.index_select(1, idx)


def _pair_products(
    x: Tensor, y: Tensor, ix: Tensor, iy: Tensor, group: int, shared_y: bool
) -> Tensor:
    """Token dot products of the pairs (x[ix], y[iy]) -> (N,P,W).

    Pairs come in runs of ``group`` that share one x: each run is one product of that x's
    tokens with the run's stacked tokens (a wide matrix, far faster than many small ones).
    """
    n = ix.numel()
    p, w, dim = x.shape[1], y.shape[1], y.shape[2]
    if group == 1:
        return torch.bmm(x[ix], y[iy].transpose(1, 2))
    xs = x[ix.view(-1, group)[:, 0]]  # (G,P,D)
    if shared_y:
        prod = torch.matmul(xs.reshape(-1, dim), y.reshape(-1, dim).T)  # (G*P, By*W)
    else:
        ys = y[iy].view(-1, group * w, dim)  # (G, group*W, D)
        prod = torch.bmm(xs, ys.transpose(1, 2))  # (G,P,group*W)
    return prod.view(-1, p, group, w).transpose(1, 2).reshape(n, p, w)


def _pair_products_streamed(
    x: Tensor, y: Tensor, ix: Tensor, iy: Tensor, group: int, shared_y: bool
) -> Tensor:
    """_pair_products without gradient, one run at a time (CPU).

    Each run's candidate tokens are gathered into one small buffer that stays in cache for
    its matrix product, instead of gathering the whole chunk's through memory.
    """
    n = ix.numel()
    p, w, dim = x.shape[1], y.shape[1], y.shape[2]
    if group == 1:
        return torch.bmm(x[ix], y[iy].transpose(1, 2))
    runs = n // group
    prod = torch.empty((runs, p, group * w), dtype=x.dtype, device=x.device)
    firsts = ix.view(runs, group)[:, 0].tolist()
    if shared_y:
        y_t = y.reshape(-1, dim).T
        for r, i in enumerate(firsts):
            torch.mm(x[i], y_t, out=prod[r])
    else:
        buf = torch.empty((group, w, dim), dtype=y.dtype, device=y.device)
        cols = iy.view(runs, group)
        for r, i in enumerate(firsts):
            torch.index_select(y, 0, cols[r], out=buf)
            torch.mm(x[i], buf.view(group * w, dim).T, out=prod[r])
    return prod.view(runs, p, group, w).transpose(1, 2).reshape(n, p, w)


# ----------------------------------------------------------------------------- compilation


def _eager_stage(fn: Callable, *args):
    """Run a stage eagerly (the counterpart of _Compiler.stage)."""
    return fn(*args)


class _Compiler:
    """Lazily compiled stages of the no-gradient path, with a clean fallback to eager."""

    def __init__(self) -> None:
        env = os.environ.get("OTCCLIP_OT_COMPILE", "auto").strip().lower()
        self.mode = env if env in _COMPILE_MODES else "auto"
        self.failed = False
        self._compiled: dict[Callable, Callable] = {}
        self._lock = threading.Lock()

    def how(self, work: int) -> str:
        """ "compiled" or "eager" for a no-gradient call of ``work`` pair-iterations."""
        if self.failed or self.mode == "off":
            return "eager"
        return "compiled" if self.mode == "on" or work >= _COMPILE_MIN_WORK else "eager"

    def _get(self, fn: Callable) -> Callable:
        compiled = self._compiled.get(fn)
        if compiled is None:
            with self._lock:
                compiled = self._compiled.get(fn)
                if compiled is None:
                    compiled = torch.compile(fn, dynamic=False, options=_INDUCTOR_OPTIONS)
                    self._compiled[fn] = compiled
        return compiled

    def stage(self, fn: Callable, *args):
        """fn(*args) through torch.compile; eagerly (for good) once compilation has failed."""
        if not self.failed:
            try:
                return self._get(fn)(*args)
            except Exception as err:  # noqa: BLE001 - any compiler failure means: run eagerly
                self.failed = True
                log.warning(
                    "torch.compile of the Sinkhorn stages failed (%s); running eagerly", err
                )
        return fn(*args)

    def block(self, k, kt, a, b, u, n: int, fi: float):
        if self.failed:
            return _eager_block(k, kt, a, b, u, n, fi)
        return self.stage(_kernel_block, k, kt, a, b, u, n, fi)


_COMPILER = _Compiler()
