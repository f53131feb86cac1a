//! The portable kernel, for CPUs without AVX-512: a tile of scores is computed
//! by the `gemm` crate (its own SIMD kernels for AVX2, NEON, ...) into a small
//! L2-sized buffer and scanned against the rows' thresholds right away, so the
//! full score matrix is still never materialised.

use super::select::RowsTopK;
use crate::matrix::MatRef;

/// Pool rows per tile: with at most 512 queries the score tile is 512 KiB.
const TILE: usize = 256;

/// Scores queries `q0..q1` against pool rows `p0..p1` and offers them to `sel`.
/// Returns whether any score was NaN or infinite.
pub(crate) fn scan(
    queries: MatRef<'_>,
    q0: usize,
    q1: usize,
    pool: MatRef<'_>,
    p0: usize,
    p1: usize,
    sel: &mut RowsTopK,
) -> bool {
    let d = queries.cols();
    let mut nonfinite = false;
    let nq = q1 - q0;
    let mut tile = vec![0f32; nq * TILE];
    let mut thr: Vec<f32> = (0..nq).map(|r| sel.threshold(r)).collect();
    let mut j = p0;
    while j < p1 {
        let mt = (p1 - j).min(TILE);
        // SAFETY: dst is nq x mt row-major inside `tile`; lhs is rows q0..q1 of
        // `queries` (row stride d, column stride 1); rhs (d x mt) is pool rows
        // j..j+mt read transposed (row stride 1, column stride d). All in bounds.
        unsafe {
            gemm::gemm(
                nq,
                mt,
                d,
                tile.as_mut_ptr(),
                1,
                mt as isize,
                false,
                queries.as_slice().as_ptr().add(q0 * d),
                1,
                d as isize,
                pool.as_slice().as_ptr().add(j * d),
                d as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        for (r, t) in thr.iter_mut().enumerate() {
            let row = &tile[r * mt..(r + 1) * mt];
            nonfinite |= row.iter().fold(false, |b, s| b | !s.is_finite());
            for (c, &s) in row.iter().enumerate() {
                if s >= *t {
                    *t = sel.offer(r, s, (j + c) as u32);
                }
            }
        }
        j += mt;
    }
    nonfinite
}
