//! Exact inner-product top-k: a blocked product of queries and pool fused with
//! a per-row bounded selection, parallel over blocks of queries (and parts of
//! the pool when there are too few query blocks to keep every thread busy).
//!
//! Memory stays O(N k + tiles): the N x M score matrix is never built.

#[cfg(target_arch = "x86_64")]
mod avx512;
mod portable;
mod select;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::matrix::MatRef;
use crate::threads::{run_in_pool, Threads};
use select::RowsTopK;

/// Which inner kernel computes the scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernel {
    /// The fastest one this CPU supports, unless the environment variable
    /// `OTMATCH_KERNEL` says `portable` or `avx512` (for comparisons).
    #[default]
    Auto,
    /// The hand-written AVX-512 kernel (an error where the CPU lacks AVX-512F).
    Avx512,
    /// The `gemm` crate's kernels with a tile buffer: runs everywhere.
    Portable,
}

impl Kernel {
    /// The kernel `Auto` resolves to on this CPU, by name ("avx512" or "portable").
    pub fn resolved_name(self) -> &'static str {
        match self.resolve() {
            Ok(Kernel::Avx512) => "avx512",
            _ => "portable",
        }
    }

    fn resolve(self) -> Result<Kernel> {
        let has_avx512 = avx512_available();
        let chosen = match self {
            // A diagnostic override, to compare kernels on one machine.
            Kernel::Auto => match std::env::var("OTMATCH_KERNEL").as_deref() {
                Ok("portable") => Kernel::Portable,
                Ok("avx512") => Kernel::Avx512,
                _ => Kernel::Auto,
            },
            k => k,
        };
        match chosen {
            Kernel::Auto if has_avx512 => Ok(Kernel::Avx512),
            Kernel::Auto => Ok(Kernel::Portable),
            Kernel::Avx512 if !has_avx512 => Err(Error::invalid(
                "the avx512 kernel needs a CPU with AVX-512F; use Kernel::Auto",
            )),
            k => Ok(k),
        }
    }
}

fn avx512_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        avx512::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// How [`topk_into`] runs: threads and kernel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TopkConfig {
    /// Worker threads.
    pub threads: Threads,
    /// Inner kernel.
    pub kernel: Kernel,
}

/// The result of [`topk`]: `rows x k` pool indices and scores, row-major, each
/// row sorted by score (descending), ties broken by the lower pool index.
#[derive(Debug, Clone, PartialEq)]
pub struct TopK {
    /// Number of query rows.
    pub rows: usize,
    /// Candidates per row.
    pub k: usize,
    /// Pool indices, `rows * k`.
    pub indices: Vec<i64>,
    /// Inner products, `rows * k`.
    pub scores: Vec<f32>,
}

/// The `k` pool rows with the largest inner product with each query row.
///
/// Exact (no approximation): the answer equals a brute-force scan up to the
/// rounding of `f32` sums. Refuses empty inputs, `k` outside `1..=M`,
/// mismatched dimensions, NaN/inf, and values whose products overflow `f32`.
pub fn topk(queries: MatRef<'_>, pool: MatRef<'_>, k: usize, threads: Threads) -> Result<TopK> {
    let config = TopkConfig {
        threads,
        kernel: Kernel::Auto,
    };
    let n = queries.rows();
    let len = n
        .checked_mul(k)
        .ok_or_else(|| Error::invalid("rows x k overflows usize"))?;
    validate_shapes(queries, pool, k)?;
    let mut indices = vec![0i64; len];
    let mut scores = vec![0f32; len];
    topk_into(queries, pool, k, &config, &mut indices, &mut scores)?;
    Ok(TopK {
        rows: n,
        k,
        indices,
        scores,
    })
}

/// [`topk`] writing into caller-owned buffers of `N * k` entries (for example
/// numpy arrays), so that the results are not copied either. After an error
/// the buffers hold nothing meaningful.
pub fn topk_into(
    queries: MatRef<'_>,
    pool: MatRef<'_>,
    k: usize,
    config: &TopkConfig,
    indices: &mut [i64],
    scores: &mut [f32],
) -> Result<()> {
    validate_shapes(queries, pool, k)?;
    let n = queries.rows();
    if indices.len() != n * k || scores.len() != n * k {
        return Err(Error::invalid(format!(
            "output buffers must hold N*k = {} entries, got {} indices and {} scores",
            n * k,
            indices.len(),
            scores.len()
        )));
    }
    let kernel = config.kernel.resolve()?;
    run_in_pool(config.threads, || {
        let plan = Plan::new(n, pool.rows(), queries.cols(), rayon::current_num_threads());
        // A NaN or inf in the inputs, or an overflow, makes some score NaN or
        // inf (x - x of it is NaN): the kernels watch every score they compute,
        // which costs far less than a separate pass over the pool before each call.
        if run(queries, pool, k, kernel, plan, indices, scores) {
            return Err(explain_nonfinite(queries, pool));
        }
        Ok(())
    })?
}

fn validate_shapes(queries: MatRef<'_>, pool: MatRef<'_>, k: usize) -> Result<()> {
    let (n, m) = (queries.rows(), pool.rows());
    if n == 0 {
        return Err(Error::invalid("queries is empty: need at least one row"));
    }
    if m == 0 {
        return Err(Error::invalid("pool is empty: need at least one row"));
    }
    if queries.cols() == 0 {
        return Err(Error::invalid(
            "embedding dimension d is 0: need at least 1 column",
        ));
    }
    if queries.cols() != pool.cols() {
        return Err(Error::invalid(format!(
            "queries have d = {} columns but pool has d = {}",
            queries.cols(),
            pool.cols()
        )));
    }
    if k == 0 {
        return Err(Error::invalid("k must be at least 1, got 0"));
    }
    if k > m {
        return Err(Error::invalid(format!(
            "k = {k} exceeds the pool's {m} rows"
        )));
    }
    if m > u32::MAX as usize {
        return Err(Error::invalid(format!(
            "the pool has {m} rows; at most {} are supported",
            u32::MAX
        )));
    }
    Ok(())
}

/// First non-finite value (row, column) of `m`.
fn first_nonfinite(m: MatRef<'_>) -> Option<(usize, usize)> {
    const ROWS: usize = 256;
    let d = m.cols();
    m.as_slice()
        .par_chunks(ROWS * d)
        .enumerate()
        .filter_map(|(b, block)| {
            let pos = block.iter().position(|x| !x.is_finite())?;
            Some((b * ROWS + pos / d, pos % d))
        })
        .min()
}

/// Says why some score came out NaN or infinite: a non-finite input (named by
/// its first position), or else an overflow of the float32 sums.
fn explain_nonfinite(queries: MatRef<'_>, pool: MatRef<'_>) -> Error {
    if let Some((r, c)) = first_nonfinite(queries) {
        return Error::NonFinite(format!(
            "queries contain NaN or infinity (first at row {r}, column {c})"
        ));
    }
    if let Some((r, c)) = first_nonfinite(pool) {
        return Error::NonFinite(format!(
            "pool contains NaN or infinity (first at row {r}, column {c})"
        ));
    }
    Error::NonFinite(
        "inner products overflow float32: the embeddings' values are too large (normalise the rows)"
            .into(),
    )
}

/// Most queries per block (a multiple of 32: the AVX-512 kernel's panel width).
const MAX_QUERY_BLOCK: usize = 512;
/// Bytes of packed queries per block: half of a 2 MiB L2, so that the block
/// stays in L2 next to the pool rows streaming through it.
const QUERY_BLOCK_BYTES: usize = 512 * 1024;

/// Queries per block for dimension `d`: as many as fit [`QUERY_BLOCK_BYTES`].
fn max_query_block(d: usize) -> usize {
    (QUERY_BLOCK_BYTES / (4 * d.max(1)) / 32 * 32).clamp(32, MAX_QUERY_BLOCK)
}
/// Fewest pool rows a task scans when the pool is split across tasks.
const MIN_POOL_CHUNK: usize = 2048;

/// How the work is cut into tasks.
#[derive(Debug, Clone, Copy)]
struct Plan {
    query_block: usize,
    pool_chunks: usize,
    pool_chunk: usize,
}

impl Plan {
    fn new(n: usize, m: usize, d: usize, threads: usize) -> Plan {
        // Several tasks per thread, so that a slow thread does not hold up the rest.
        let want = if threads <= 1 { 1 } else { 4 * threads };
        let max_block = max_query_block(d);
        // Large query blocks first: each task streams its part of the pool once,
        // so a block of 32 queries reads 8x more pool per flop than one of 256.
        // With too few blocks, split the pool rather than shrink the blocks.
        let full_blocks = n.div_ceil(max_block);
        let pool_chunks = want
            .div_ceil(full_blocks)
            .clamp(1, (m / MIN_POOL_CHUNK).max(1));
        let blocks_wanted = want.div_ceil(pool_chunks);
        let query_block = n
            .div_ceil(blocks_wanted)
            .next_multiple_of(32)
            .clamp(32, max_block);
        Plan {
            query_block,
            pool_chunks,
            pool_chunk: m.div_ceil(pool_chunks),
        }
    }
}

/// Fills `indices`/`scores`; returns whether any score was NaN or infinite
/// (the outputs are then meaningless).
fn run(
    queries: MatRef<'_>,
    pool: MatRef<'_>,
    k: usize,
    kernel: Kernel,
    plan: Plan,
    indices: &mut [i64],
    scores: &mut [f32],
) -> bool {
    let n = queries.rows();
    let m = pool.rows();
    let qb = plan.query_block;
    indices
        .par_chunks_mut(qb * k)
        .zip(scores.par_chunks_mut(qb * k))
        .enumerate()
        .map(|(b, (idx_out, score_out))| {
            let q0 = b * qb;
            let q1 = (q0 + qb).min(n);
            let (sel, nonfinite) = if plan.pool_chunks == 1 {
                scan(kernel, queries, q0, q1, pool, 0, m, k)
            } else {
                let parts: Vec<(RowsTopK, bool)> = (0..plan.pool_chunks)
                    .into_par_iter()
                    .map(|c| {
                        let p0 = (c * plan.pool_chunk).min(m);
                        let p1 = ((c + 1) * plan.pool_chunk).min(m);
                        scan(kernel, queries, q0, q1, pool, p0, p1, k)
                    })
                    .collect();
                let mut parts = parts.into_iter();
                let (mut sel, mut nonfinite) = parts.next().expect("at least one pool chunk");
                for (part, bad) in parts {
                    sel.merge(&part);
                    nonfinite |= bad;
                }
                (sel, nonfinite)
            };
            for r in 0..q1 - q0 {
                sel.write_sorted(
                    r,
                    &mut idx_out[r * k..(r + 1) * k],
                    &mut score_out[r * k..(r + 1) * k],
                );
            }
            nonfinite
        })
        .reduce(|| false, |a, b| a | b)
}

/// The top k of queries `q0..q1` among pool rows `p0..p1`.
#[allow(clippy::too_many_arguments)]
fn scan(
    kernel: Kernel,
    queries: MatRef<'_>,
    q0: usize,
    q1: usize,
    pool: MatRef<'_>,
    p0: usize,
    p1: usize,
    k: usize,
) -> (RowsTopK, bool) {
    let mut sel = RowsTopK::new(q1 - q0, k);
    let nonfinite = match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => {
            let mut panels = QueryPanels::pack(queries, q0, q1);
            // SAFETY: `Kernel::resolve` only yields Avx512 when the CPU has
            // AVX-512F; the panels were packed from `queries`, whose d equals the pool's.
            unsafe { avx512::scan(&mut panels, pool.as_slice(), pool.cols(), p0, p1, &mut sel) }
        }
        _ => portable::scan(queries, q0, q1, pool, p0, p1, &mut sel),
    };
    (sel, nonfinite)
}

/// A block of queries packed for the AVX-512 kernel: panels of 32 queries laid
/// out column by column (`d x 32`, 64-byte aligned), zero-padded, with each
/// query's current admission threshold (`+inf` on padding lanes: never admitted).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct QueryPanels {
    buf: Vec<f32>,
    offset: usize,
    d: usize,
    count: usize,
    thresholds: Vec<f32>,
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
impl QueryPanels {
    fn pack(queries: MatRef<'_>, q0: usize, q1: usize) -> QueryPanels {
        let d = queries.cols();
        let nq = q1 - q0;
        let count = nq.div_ceil(32);
        let mut buf = vec![0f32; count * d * 32 + 16];
        let offset = buf.as_ptr().align_offset(64).min(15);
        for p in 0..count {
            let panel = &mut buf[offset + p * d * 32..offset + (p + 1) * d * 32];
            for lane in 0..32.min(nq - p * 32) {
                let row = queries.row(q0 + p * 32 + lane);
                for (kk, &x) in row.iter().enumerate() {
                    panel[kk * 32 + lane] = x;
                }
            }
        }
        let mut thresholds = vec![f32::INFINITY; count * 32];
        thresholds[..nq].fill(f32::NEG_INFINITY);
        QueryPanels {
            buf,
            offset,
            d,
            count,
            thresholds,
        }
    }

    pub(crate) fn count(&self) -> usize {
        self.count
    }

    pub(crate) fn panel_ptr(&self, p: usize) -> *const f32 {
        self.buf[self.offset + p * self.d * 32..].as_ptr()
    }

    pub(crate) fn thresholds_ptr(&self, p: usize) -> *const f32 {
        self.thresholds[p * 32..].as_ptr()
    }

    pub(crate) fn set_threshold(&mut self, row: usize, t: f32) {
        self.thresholds[row] = t;
    }
}

#[cfg(test)]
mod tests;
