//! Per-row bounded selection: the k best (score, pool index) pairs seen so far.
//!
//! "Best" is a total order: higher score first, then lower pool index, so that
//! the result does not depend on the order in which tiles are visited.

/// `true` when `(sa, ia)` ranks strictly before `(sb, ib)`.
#[inline(always)]
pub(crate) fn ranks_before(sa: f32, ia: u32, sb: f32, ib: u32) -> bool {
    sa > sb || (sa == sb && ia < ib)
}

/// The k best candidates of many rows, stored flat: one min-heap (worst at the
/// root) of at most `k` entries per row, and the row's admission threshold.
pub(crate) struct RowsTopK {
    k: usize,
    scores: Vec<f32>,
    indices: Vec<u32>,
    len: Vec<u32>,
}

impl RowsTopK {
    pub(crate) fn new(rows: usize, k: usize) -> Self {
        RowsTopK {
            k,
            scores: vec![0.0; rows * k],
            indices: vec![0; rows * k],
            len: vec![0; rows],
        }
    }

    pub(crate) fn rows(&self) -> usize {
        self.len.len()
    }

    /// The lowest score that could still enter row `r` (`-inf` until it holds k).
    #[inline(always)]
    pub(crate) fn threshold(&self, r: usize) -> f32 {
        if (self.len[r] as usize) < self.k {
            f32::NEG_INFINITY
        } else {
            self.scores[r * self.k]
        }
    }

    /// Offers a candidate to row `r`; returns the row's new threshold.
    #[inline]
    pub(crate) fn offer(&mut self, r: usize, score: f32, index: u32) -> f32 {
        let k = self.k;
        let base = r * k;
        let s = &mut self.scores[base..base + k];
        let ix = &mut self.indices[base..base + k];
        let len = self.len[r] as usize;
        if len < k {
            // Sift up from the new leaf.
            let mut c = len;
            while c > 0 {
                let p = (c - 1) / 2;
                if ranks_before(s[p], ix[p], score, index) {
                    s[c] = s[p];
                    ix[c] = ix[p];
                    c = p;
                } else {
                    break;
                }
            }
            s[c] = score;
            ix[c] = index;
            self.len[r] += 1;
            return if len + 1 < k { f32::NEG_INFINITY } else { s[0] };
        }
        if !ranks_before(score, index, s[0], ix[0]) {
            return s[0];
        }
        // Replace the root (the worst) and sift down.
        let mut p = 0;
        loop {
            let l = 2 * p + 1;
            if l >= k {
                break;
            }
            let r2 = l + 1;
            // The worse child: the one that ranks after the other.
            let w = if r2 < k && ranks_before(s[l], ix[l], s[r2], ix[r2]) {
                r2
            } else {
                l
            };
            if ranks_before(score, index, s[w], ix[w]) {
                s[p] = s[w];
                ix[p] = ix[w];
                p = w;
            } else {
                break;
            }
        }
        s[p] = score;
        ix[p] = index;
        s[0]
    }

    /// Moves every candidate of `other` (the same rows, another part of the pool) into `self`.
    pub(crate) fn merge(&mut self, other: &RowsTopK) {
        for r in 0..other.rows() {
            let base = r * other.k;
            for e in 0..other.len[r] as usize {
                self.offer(r, other.scores[base + e], other.indices[base + e]);
            }
        }
    }

    /// Writes row `r` sorted best first into `idx_out` and `score_out` (k
    /// entries each). A row holds k entries unless NaN scores were refused, in
    /// which case the call fails anyway; the missing places get (-1, NaN).
    pub(crate) fn write_sorted(&self, r: usize, idx_out: &mut [i64], score_out: &mut [f32]) {
        let k = self.k;
        let base = r * k;
        let len = self.len[r] as usize;
        idx_out[len..].fill(-1);
        score_out[len..].fill(f32::NAN);
        let mut order: Vec<(f32, u32)> = (0..len)
            .map(|e| (self.scores[base + e], self.indices[base + e]))
            .collect();
        order.sort_unstable_by(|a, b| {
            b.0.partial_cmp(&a.0)
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(a.1.cmp(&b.1))
        });
        for (e, (s, i)) in order.into_iter().enumerate() {
            score_out[e] = s;
            idx_out[e] = i64::from(i);
        }
    }
}
