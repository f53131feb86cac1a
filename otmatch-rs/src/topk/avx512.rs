//! The AVX-512 kernel: a register-blocked product of 12 pool rows by a packed
//! panel of 32 queries, with the top-k admission test done on the registers, so
//! that no score is ever written to memory unless it enters a row's top k.
//!
//! Vectors run along queries (two zmm = 32 queries), pool values are broadcast
//! straight from the caller's rows: the pool is never packed or copied. The 12
//! pool rows stay in L1/L2 while the packed query block (at most 1 MiB) streams
//! from L2; 24 accumulators + 2 query vectors + 1 broadcast fit in 32 registers.

use std::arch::x86_64::*;

use super::select::RowsTopK;
use super::QueryPanels;

/// Pool rows per micro-tile.
const ROWS: usize = 12;

/// Whether this CPU can run the kernel.
pub(crate) fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

/// Scores every packed query against pool rows `p0..p1` (`pool` is the whole
/// pool, row-major with `d` columns) and offers the scores to `sel`. Returns
/// whether any score was NaN or infinite (a non-finite input, or overflow).
///
/// # Safety
/// The CPU must support AVX-512F (see [`available`]); `pool` must hold rows
/// `p0..p1` of `d` values each, and `panels` must have been packed with the same `d`.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn scan(
    panels: &mut QueryPanels,
    pool: &[f32],
    d: usize,
    p0: usize,
    p1: usize,
    sel: &mut RowsTopK,
) -> bool {
    debug_assert!(pool.len() >= p1 * d);
    // Sums x - x over every score: 0 while all are finite, NaN for ever after.
    let mut check = _mm512_setzero_ps();
    let mut j = p0;
    while j < p1 {
        let r = (p1 - j).min(ROWS);
        for panel in 0..panels.count() {
            // SAFETY: rows j..j+r exist in `pool`; the panel holds d x 32 values.
            unsafe {
                let a = pool.as_ptr().add(j * d);
                match r {
                    12 => tile::<12>(a, d, j, panels, panel, sel, &mut check),
                    11 => tile::<11>(a, d, j, panels, panel, sel, &mut check),
                    10 => tile::<10>(a, d, j, panels, panel, sel, &mut check),
                    9 => tile::<9>(a, d, j, panels, panel, sel, &mut check),
                    8 => tile::<8>(a, d, j, panels, panel, sel, &mut check),
                    7 => tile::<7>(a, d, j, panels, panel, sel, &mut check),
                    6 => tile::<6>(a, d, j, panels, panel, sel, &mut check),
                    5 => tile::<5>(a, d, j, panels, panel, sel, &mut check),
                    4 => tile::<4>(a, d, j, panels, panel, sel, &mut check),
                    3 => tile::<3>(a, d, j, panels, panel, sel, &mut check),
                    2 => tile::<2>(a, d, j, panels, panel, sel, &mut check),
                    _ => tile::<1>(a, d, j, panels, panel, sel, &mut check),
                }
            }
        }
        j += r;
    }
    _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(check, check) != 0
}

/// One micro-tile: `R` pool rows starting at pool index `j` against query panel `panel`.
#[inline(always)]
unsafe fn tile<const R: usize>(
    a: *const f32,
    d: usize,
    j: usize,
    panels: &mut QueryPanels,
    panel: usize,
    sel: &mut RowsTopK,
    check: &mut __m512,
) {
    // SAFETY (whole body): the caller guarantees R rows of d values at `a`, and
    // the panel holds d x 32 values; only called from `scan`, which enables AVX-512F.
    unsafe {
        let b = panels.panel_ptr(panel);
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for kk in 0..d {
            let b0 = _mm512_loadu_ps(b.add(kk * 32));
            let b1 = _mm512_loadu_ps(b.add(kk * 32 + 16));
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*a.add(r * d + kk));
                acc_r[0] = _mm512_fmadd_ps(x, b0, acc_r[0]);
                acc_r[1] = _mm512_fmadd_ps(x, b1, acc_r[1]);
            }
        }
        let row0 = panel * 32;
        for acc_r in &acc {
            *check = _mm512_add_ps(*check, _mm512_sub_ps(acc_r[0], acc_r[0]));
            *check = _mm512_add_ps(*check, _mm512_sub_ps(acc_r[1], acc_r[1]));
        }
        for (r, acc_r) in acc.iter().enumerate() {
            let thr = panels.thresholds_ptr(panel);
            let t0 = _mm512_loadu_ps(thr);
            let t1 = _mm512_loadu_ps(thr.add(16));
            let m0 = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(acc_r[0], t0) as u32;
            let m1 = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(acc_r[1], t1) as u32;
            let mut m = m0 | (m1 << 16);
            if m != 0 {
                let mut s = [0f32; 32];
                _mm512_storeu_ps(s.as_mut_ptr(), acc_r[0]);
                _mm512_storeu_ps(s.as_mut_ptr().add(16), acc_r[1]);
                let index = (j + r) as u32;
                while m != 0 {
                    let lane = m.trailing_zeros() as usize;
                    m &= m - 1;
                    let t = sel.offer(row0 + lane, s[lane], index);
                    panels.set_threshold(row0 + lane, t);
                }
            }
        }
    }
}
