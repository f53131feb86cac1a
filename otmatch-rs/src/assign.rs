//! One caption per image, from each image's candidates and their scores.
//!
//! `argmax` lets many images share a caption; `capacity` caps how many images
//! one caption may take, so that a single caption (a poison written to match
//! many images, or a generic one) cannot absorb a crowd. The keep-own margin
//! leaves an image with its own caption unless a candidate beats it clearly,
//! which protects clean pairs from an immature model's opinions.

use std::collections::HashMap;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::threads::{run_in_pool, Threads};

/// How captions are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Method {
    /// Each image takes its best candidate; captions may be shared without limit.
    #[default]
    Argmax,
    /// Each caption goes to at most `capacity` images, greedily in global score
    /// order (score descending, then image index, then the image's own ranking
    /// of its candidates); an image whose candidates are all full falls back.
    Capacity(usize),
}

/// What an image gets when none of its candidates has room left (capacity only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fallback {
    /// Its own caption (beyond the capacity: it is the pairing the data came
    /// with, not a reassignment), or unassigned when it has none.
    #[default]
    Own,
    /// No caption (`-1`).
    Unassigned,
}

/// The knobs of [`assign`].
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct AssignConfig {
    /// argmax or capacity.
    pub method: Method,
    /// Keep the own caption when `own_score >= best - margin` (finite, `>= 0`).
    pub margin: f32,
    /// What an image whose candidates are all full gets.
    pub fallback: Fallback,
}

/// Counts that summarise an assignment round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AssignStats {
    /// Images.
    pub n: usize,
    /// Images whose caption differs from their own (0 without `own`).
    pub changed: usize,
    /// Distinct captions in use.
    pub distinct: usize,
    /// Most images sharing one caption.
    pub max_load: usize,
    /// Images left without a caption.
    pub unassigned: usize,
    /// Images that kept their own caption thanks to the margin although
    /// their best candidate was another caption.
    pub kept_by_margin: usize,
}

/// The caption chosen for every image.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    /// Pool index per image, `-1` when unassigned.
    pub caption: Vec<i64>,
    /// `caption != own` per image (all `false` without `own`).
    pub changed: Vec<bool>,
    /// Score of the assigned caption (NaN when unassigned or unknown).
    pub score: Vec<f32>,
    /// Summary counts.
    pub stats: AssignStats,
}

/// Chooses one caption per image.
///
/// `candidates` and `scores` are `N x k` row-major (pool indices `>= 0`, finite
/// scores); rows need not be sorted. `own` (`N`, `-1` = none) is each image's
/// current caption; `own_scores` (`N`) its score, needed for the margin when
/// the own caption is not among the candidates (`-inf` means "never keep it";
/// without `own_scores`, the own caption's score is taken from the candidates
/// when present, else it cannot be kept by margin). Ties between candidates go to the lower pool index. Deterministic.
pub fn assign(
    candidates: &[i64],
    scores: &[f32],
    k: usize,
    own: Option<&[i64]>,
    own_scores: Option<&[f32]>,
    config: &AssignConfig,
) -> Result<Assignment> {
    // Validation scans in parallel too: inside the (fork-safe) pool.
    run_in_pool(Threads::Auto, || {
        let n = validate(candidates, scores, k, own, own_scores, config)?;
        let ranked = matches!(config.method, Method::Capacity(_));
        let rows = Rows::new(
            candidates,
            scores,
            k,
            own,
            own_scores,
            config.margin,
            ranked,
        )?;
        let (caption, score, kept_by_margin) = match config.method {
            Method::Argmax => argmax(&rows),
            Method::Capacity(c) => capacity(&rows, c, config.fallback),
        };
        finish(caption, score, own, kept_by_margin, n)
    })?
}

fn validate(
    candidates: &[i64],
    scores: &[f32],
    k: usize,
    own: Option<&[i64]>,
    own_scores: Option<&[f32]>,
    config: &AssignConfig,
) -> Result<usize> {
    if k == 0 {
        return Err(Error::invalid(
            "candidates need at least one column (k >= 1)",
        ));
    }
    if !candidates.len().is_multiple_of(k) {
        return Err(Error::invalid(format!(
            "{} candidate entries do not make rows of k = {k}",
            candidates.len()
        )));
    }
    let n = candidates.len() / k;
    if n == 0 {
        return Err(Error::invalid(
            "candidates is empty: need at least one image",
        ));
    }
    if n > u32::MAX as usize {
        return Err(Error::invalid(format!(
            "at most {} images are supported",
            u32::MAX
        )));
    }
    if scores.len() != candidates.len() {
        return Err(Error::invalid(format!(
            "scores must have the shape of candidates ({n}, {k}), got {} values",
            scores.len()
        )));
    }
    if let Some(own) = own {
        if own.len() != n {
            return Err(Error::invalid(format!(
                "own must have one entry per image ({n}), got {}",
                own.len()
            )));
        }
        if let Some(i) = own.iter().position(|&o| o < -1) {
            return Err(Error::invalid(format!(
                "own must be pool indices >= 0 or -1 (none); found {} at {i}",
                own[i]
            )));
        }
    }
    if let Some(os) = own_scores {
        let Some(own) = own else {
            return Err(Error::invalid("own_scores given without own"));
        };
        if os.len() != n {
            return Err(Error::invalid(format!(
                "own_scores must have one entry per image ({n}), got {}",
                os.len()
            )));
        }
        let usable = |s: f32| s.is_finite() || s == f32::NEG_INFINITY;
        if let Some(i) = (0..n).find(|&i| own[i] >= 0 && !usable(os[i])) {
            return Err(Error::NonFinite(format!(
                "own_scores[{i}] is {} (must be finite, or -inf for 'never keep', where own >= 0)",
                os[i]
            )));
        }
    }
    if !(config.margin.is_finite() && config.margin >= 0.0) {
        return Err(Error::invalid(format!(
            "margin must be finite and >= 0, got {}",
            config.margin
        )));
    }
    if config.method == Method::Capacity(0) {
        return Err(Error::invalid("capacity must be at least 1, got 0"));
    }
    Ok(n)
}

/// The precise complaint about candidates or scores, once a row was found bad.
fn check_values(candidates: &[i64], scores: &[f32], k: usize) -> Result<()> {
    if let Some(pos) = first_where(candidates, |&c| c < 0) {
        return Err(Error::invalid(format!(
            "candidates must be pool indices >= 0; found {} at row {}, column {}",
            candidates[pos],
            pos / k,
            pos % k
        )));
    }
    if let Some(pos) = first_where(scores, |s| !s.is_finite()) {
        return Err(Error::NonFinite(format!(
            "scores contain NaN or infinity (first at row {}, column {})",
            pos / k,
            pos % k
        )));
    }
    Ok(())
}

/// Index of the first element for which `bad` holds. Scans in parallel blocks
/// with a branch-free fold (vectorised), searching a block only when it has one.
fn first_where<T: Sync>(v: &[T], bad: impl Fn(&T) -> bool + Sync) -> Option<usize> {
    const BLOCK: usize = 1 << 16;
    v.par_chunks(BLOCK)
        .enumerate()
        .filter_map(|(b, block)| {
            let any = block.iter().fold(false, |acc, x| acc | bad(x));
            any.then(|| block.iter().position(&bad).map(|p| b * BLOCK + p))
                .flatten()
        })
        .min()
}

/// Rows per parallel task in the per-image passes.
const ROW_BLOCK: usize = 4096;

/// Positions of every row in rank order, or `None` when all rows already are.
fn rank_order(candidates: &[i64], scores: &[f32], k: usize) -> Option<Vec<u32>> {
    let sorted = candidates
        .par_chunks(k * ROW_BLOCK)
        .zip(scores.par_chunks(k * ROW_BLOCK))
        .all(|(cb, sb)| {
            cb.chunks_exact(k)
                .zip(sb.chunks_exact(k))
                .all(|(c, s)| (1..k).all(|e| !rank_before(s[e], c[e], s[e - 1], c[e - 1])))
        });
    if sorted {
        return None;
    }
    let mut order = vec![0u32; candidates.len()];
    order
        .par_chunks_mut(k)
        .zip(candidates.par_chunks(k).zip(scores.par_chunks(k)))
        .with_min_len(ROW_BLOCK)
        .for_each(|(o, (c, s))| {
            for (e, slot) in o.iter_mut().enumerate() {
                *slot = e as u32;
            }
            o.sort_by(|&a, &b| {
                let (a, b) = (a as usize, b as usize);
                s[b].partial_cmp(&s[a])
                    .unwrap_or(std::cmp::Ordering::Equal)
                    .then(c[a].cmp(&c[b]))
                    .then(a.cmp(&b))
            });
        });
    Some(order)
}

/// Per-image view: candidates in rank order, the best one, and the keep-own decision.
struct Rows<'a> {
    candidates: &'a [i64],
    scores: &'a [f32],
    k: usize,
    /// Positions in rank order (score desc, pool index asc); `None` when every
    /// row is already in that order (as `topk` writes them) or no walk needs it.
    order: Option<Vec<u32>>,
    own: Option<&'a [i64]>,
    /// Each image's best candidate (pool index, score).
    best: Vec<(i64, f32)>,
    /// Score of the own caption, when known.
    own_score: Vec<Option<f32>>,
    /// Whether the margin rule keeps the own caption.
    keep: Vec<bool>,
}

/// What one pass over a row learns.
struct RowFacts {
    best: (i64, f32),
    own_score: Option<f32>,
    keep: bool,
    bad: bool,
}

fn rank_before(s1: f32, c1: i64, s2: f32, c2: i64) -> bool {
    s1 > s2 || (s1 == s2 && c1 < c2)
}

impl<'a> Rows<'a> {
    /// `ranked`: whether candidates will be walked in rank order (capacity),
    /// which needs a permutation for rows not already sorted. Refuses negative
    /// candidates and non-finite scores.
    fn new(
        candidates: &'a [i64],
        scores: &'a [f32],
        k: usize,
        own: Option<&'a [i64]>,
        own_scores: Option<&[f32]>,
        margin: f32,
        ranked: bool,
    ) -> Result<Rows<'a>> {
        let n = candidates.len() / k;
        // One pass per row: validity (checked here rather than in a separate
        // scan over all N*k values), best candidate, own score, keep decision.
        let per_row: Vec<RowFacts> = (0..n)
            .into_par_iter()
            .with_min_len(ROW_BLOCK)
            .map(|i| {
                let c = &candidates[i * k..(i + 1) * k];
                let s = &scores[i * k..(i + 1) * k];
                let bad = c.iter().fold(false, |b, &x| b | (x < 0))
                    | s.iter().fold(false, |b, x| b | !x.is_finite());
                let mut best = (c[0], s[0]);
                for e in 1..k {
                    if rank_before(s[e], c[e], best.1, best.0) {
                        best = (c[e], s[e]);
                    }
                }
                let o = own.map_or(-1, |own| own[i]);
                if o < 0 {
                    return RowFacts {
                        best,
                        own_score: None,
                        keep: false,
                        bad,
                    };
                }
                let known = match own_scores {
                    // -inf: the caller says the own caption must not be kept.
                    Some(os) => Some(os[i]).filter(|s| s.is_finite()),
                    None => (0..k).filter(|&e| c[e] == o).map(|e| s[e]).reduce(f32::max),
                };
                RowFacts {
                    best,
                    own_score: known,
                    keep: known.is_some_and(|s| s >= best.1 - margin),
                    bad,
                }
            })
            .collect();
        let mut best = Vec::with_capacity(n);
        let mut own_score = Vec::with_capacity(n);
        let mut keep = Vec::with_capacity(n);
        let mut any_bad = false;
        for f in per_row {
            best.push(f.best);
            own_score.push(f.own_score);
            keep.push(f.keep);
            any_bad |= f.bad;
        }
        if any_bad {
            check_values(candidates, scores, k)?;
        }
        let order = if ranked {
            rank_order(candidates, scores, k)
        } else {
            None
        };
        Ok(Rows {
            candidates,
            scores,
            k,
            order,
            own,
            best,
            own_score,
            keep,
        })
    }

    fn n(&self) -> usize {
        self.candidates.len() / self.k
    }

    /// The candidate of rank `r` (0 = best) of image `i`: (pool index, score).
    #[inline]
    fn get(&self, i: usize, r: usize) -> (i64, f32) {
        let e = i * self.k
            + match &self.order {
                Some(o) => o[i * self.k + r] as usize,
                None => r,
            };
        (self.candidates[e], self.scores[e])
    }

    fn own(&self, i: usize) -> i64 {
        self.own.map_or(-1, |o| o[i])
    }

    fn max_index(&self) -> i64 {
        let c = self.candidates.par_iter().copied().max().unwrap_or(0);
        let o = self
            .own
            .map_or(-1, |o| o.par_iter().copied().max().unwrap_or(-1));
        c.max(o)
    }
}

fn argmax(rows: &Rows<'_>) -> (Vec<i64>, Vec<f32>, usize) {
    let picks: Vec<(i64, f32, bool)> = (0..rows.n())
        .into_par_iter()
        .with_min_len(ROW_BLOCK)
        .map(|i| {
            let (best, best_score) = rows.best[i];
            if rows.keep[i] {
                let o = rows.own(i);
                (o, rows.own_score[i].unwrap_or(f32::NAN), best != o)
            } else {
                (best, best_score, false)
            }
        })
        .collect();
    let kept = picks.iter().filter(|p| p.2).count();
    let (caption, score): (Vec<i64>, Vec<f32>) = picks.into_iter().map(|(c, s, _)| (c, s)).unzip();
    (caption, score, kept)
}

/// How many images each caption holds: a dense table when the pool indices are
/// compact enough, a hash map when they are sparse.
enum Loads {
    Dense(Vec<u32>),
    Sparse(HashMap<i64, u32>),
}

impl Loads {
    fn new(max_index: i64, entries: usize) -> Loads {
        let size = usize::try_from(max_index.saturating_add(1)).unwrap_or(usize::MAX);
        if size <= entries.saturating_mul(8).max(1 << 16) {
            Loads::Dense(vec![0; size])
        } else {
            Loads::Sparse(HashMap::new())
        }
    }

    #[inline]
    fn get(&self, c: i64) -> u32 {
        match self {
            Loads::Dense(v) => v[c as usize],
            Loads::Sparse(m) => m.get(&c).copied().unwrap_or(0),
        }
    }

    #[inline]
    fn add(&mut self, c: i64) {
        match self {
            Loads::Dense(v) => v[c as usize] += 1,
            Loads::Sparse(m) => *m.entry(c).or_insert(0) += 1,
        }
    }

    /// (distinct captions with a load, largest load).
    fn summary(&self) -> (usize, usize) {
        match self {
            Loads::Dense(v) => v
                .par_iter()
                .fold(
                    || (0, 0),
                    |(d, m), &l| (d + usize::from(l > 0), m.max(l as usize)),
                )
                .reduce(|| (0, 0), |a, b| (a.0 + b.0, a.1.max(b.1))),
            Loads::Sparse(m) => (m.len(), m.values().copied().max().unwrap_or(0) as usize),
        }
    }
}

/// Heap key: larger score first, then lower image index.
#[inline]
fn key(score: f32, image: usize) -> u64 {
    let b = score.to_bits();
    let s = if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    };
    (u64::from(s) << 32) | u64::from(!(image as u32))
}

/// The score a [`key`] was made from.
#[inline]
fn score_of(key: u64) -> f32 {
    let s = (key >> 32) as u32;
    f32::from_bits(if s & 0x8000_0000 != 0 {
        s & 0x7fff_ffff
    } else {
        !s
    })
}

#[inline]
fn image_of(key: u64) -> usize {
    (!(key as u32)) as usize
}

fn capacity(rows: &Rows<'_>, cap: usize, fallback: Fallback) -> (Vec<i64>, Vec<f32>, usize) {
    let n = rows.n();
    let cap = u32::try_from(cap).unwrap_or(u32::MAX);
    let mut loads = Loads::new(rows.max_index(), n * rows.k + n);
    let mut caption = vec![-1i64; n];
    let mut score = vec![f32::NAN; n];
    let mut kept = 0;

    // 1. Images kept by the margin claim their own caption first, best own score first.
    let mut keepers: Vec<u64> = (0..n)
        .filter(|&i| rows.keep[i])
        .map(|i| key(rows.own_score[i].unwrap_or(f32::NEG_INFINITY), i))
        .collect();
    keepers.par_sort_unstable_by(|a, b| b.cmp(a));
    for &kk in &keepers {
        let i = image_of(kk);
        let o = rows.own(i);
        if loads.get(o) < cap {
            loads.add(o);
            caption[i] = o;
            score[i] = rows.own_score[i].unwrap_or(f32::NAN);
            kept += usize::from(rows.best[i].0 != o);
        }
    }

    // 2. Everyone else: greedy in global score order. Each image waits in line
    //    with its best candidate that still has room; when that one fills up
    //    before its turn, it moves on to its next one. Loads only grow, so a
    //    candidate found full once is skipped for good: the result is that of
    //    walking all N*k entries in global order, at the cost of N plus retries.
    let advance = |i: usize, from: usize, loads: &Loads| -> Option<usize> {
        (from..rows.k).find(|&r| loads.get(rows.get(i, r).0) < cap)
    };
    let mut next_rank: Vec<u32> = (0..n)
        .into_par_iter()
        .with_min_len(ROW_BLOCK)
        .map(|i| {
            let waiting = caption[i] < 0;
            let r = if waiting { advance(i, 0, &loads) } else { None };
            r.map_or(u32::MAX, |r| r as u32)
        })
        .collect();
    // (key, caption): the caption rides along so that the walk below touches
    // only the load table, not the candidate arrays.
    let mut first: Vec<(u64, i64)> = (0..n)
        .into_par_iter()
        .with_min_len(ROW_BLOCK)
        .filter(|&i| next_rank[i] != u32::MAX)
        .map(|i| {
            let (c, s) = rows.get(i, next_rank[i] as usize);
            (key(s, i), c)
        })
        .collect();
    first.par_sort_unstable_by(|a, b| b.0.cmp(&a.0));
    let mut retry = std::collections::BinaryHeap::<(u64, i64)>::new();
    let mut sorted = first.into_iter().peekable();
    loop {
        let entry = match (sorted.peek(), retry.peek()) {
            (Some(a), Some(b)) if b.0 > a.0 => retry.pop(),
            (Some(_), _) => sorted.next(),
            (None, _) => retry.pop(),
        };
        let Some((kk, c)) = entry else { break };
        let i = image_of(kk);
        if loads.get(c) < cap {
            loads.add(c);
            caption[i] = c;
            score[i] = score_of(kk);
        } else if let Some(r) = advance(i, next_rank[i] as usize + 1, &loads) {
            next_rank[i] = r as u32;
            let (c, s) = rows.get(i, r);
            retry.push((key(s, i), c));
        }
    }

    // 3. Whoever is left falls back.
    if fallback == Fallback::Own {
        for i in 0..n {
            let o = rows.own(i);
            if caption[i] < 0 && o >= 0 {
                caption[i] = o;
                score[i] = rows.own_score[i].unwrap_or(f32::NAN);
            }
        }
    }
    (caption, score, kept)
}

fn finish(
    caption: Vec<i64>,
    score: Vec<f32>,
    own: Option<&[i64]>,
    kept_by_margin: usize,
    n: usize,
) -> Result<Assignment> {
    let changed: Vec<bool> = match own {
        Some(own) => caption
            .par_iter()
            .with_min_len(ROW_BLOCK)
            .zip(own)
            .map(|(c, o)| c != o)
            .collect(),
        None => vec![false; n],
    };
    let max_index = caption.par_iter().copied().max().unwrap_or(-1);
    let mut loads = Loads::new(max_index, n);
    let mut unassigned = 0;
    for &c in &caption {
        if c >= 0 {
            loads.add(c);
        } else {
            unassigned += 1;
        }
    }
    let (distinct, max_load) = loads.summary();
    let stats = AssignStats {
        n,
        changed: changed.iter().filter(|&&c| c).count(),
        distinct,
        max_load,
        unassigned,
        kept_by_margin,
    };
    Ok(Assignment {
        caption,
        changed,
        score,
        stats,
    })
}

#[cfg(test)]
mod tests;
