use proptest::prelude::*;

use super::*;

/// Brute force in f64: every score, sorted by (score desc, index asc).
fn brute(q: &[f32], p: &[f32], d: usize, k: usize) -> (Vec<i64>, Vec<f32>) {
    let n = q.len() / d;
    let m = p.len() / d;
    let mut idx = Vec::new();
    let mut sc = Vec::new();
    for i in 0..n {
        let mut all: Vec<(f64, usize)> = (0..m)
            .map(|j| {
                let s = (0..d)
                    .map(|t| f64::from(q[i * d + t]) * f64::from(p[j * d + t]))
                    .sum::<f64>();
                (s, j)
            })
            .collect();
        all.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)));
        for &(s, j) in &all[..k] {
            idx.push(j as i64);
            sc.push(s as f32);
        }
    }
    (idx, sc)
}

fn kernels() -> Vec<Kernel> {
    let mut ks = vec![Kernel::Portable];
    if avx512_available() {
        ks.push(Kernel::Avx512);
    }
    ks
}

/// Runs one kernel with an explicit plan (to force pool splitting).
fn run_with(
    q: &[f32],
    p: &[f32],
    d: usize,
    k: usize,
    kernel: Kernel,
    plan: Plan,
) -> (Vec<i64>, Vec<f32>) {
    let qm = MatRef::new(q, q.len() / d, d).unwrap();
    let pm = MatRef::new(p, p.len() / d, d).unwrap();
    let mut idx = vec![0; qm.rows() * k];
    let mut sc = vec![0.0; qm.rows() * k];
    assert!(!run(qm, pm, k, kernel, plan, &mut idx, &mut sc));
    (idx, sc)
}

/// Small integers: every product and sum is exact in f32, and ties abound.
fn int_matrix(rows: usize, d: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..rows * d)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) % 7) as f32 - 3.0
        })
        .collect()
}

/// Uniform floats in [-1, 1).
fn float_matrix(rows: usize, d: usize, seed: u64) -> Vec<f32> {
    let mut s = seed ^ 0x9E37_79B9_7F4A_7C15;
    (0..rows * d)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

#[test]
fn exact_on_integers_with_ties_every_kernel_and_plan() {
    let (n, m, d, k) = (70, 301, 19, 16);
    let q = int_matrix(n, d, 1);
    let p = int_matrix(m, d, 2);
    let want = brute(&q, &p, d, k);
    for kernel in kernels() {
        for plan in [
            Plan::new(n, m, d, 1),
            Plan::new(n, m, d, 8),
            Plan {
                query_block: 32,
                pool_chunks: 5,
                pool_chunk: 61,
            },
            Plan {
                query_block: 64,
                pool_chunks: 3,
                pool_chunk: 101,
            },
        ] {
            let got = run_with(&q, &p, d, k, kernel, plan);
            assert_eq!(got, want, "kernel {kernel:?} plan {plan:?}");
        }
    }
}

#[test]
fn floats_match_brute_force_up_to_rounding() {
    let (n, m, d, k) = (45, 1000, 67, 10);
    let q = float_matrix(n, d, 3);
    let p = float_matrix(m, d, 4);
    let (want_i, want_s) = brute(&q, &p, d, k);
    for kernel in kernels() {
        let (got_i, got_s) = run_with(&q, &p, d, k, kernel, Plan::new(n, m, d, 2));
        for (a, b) in got_s.iter().zip(&want_s) {
            assert!((a - b).abs() <= 1e-4, "{kernel:?}: score {a} vs {b}");
        }
        // Random floats have no near-ties at this tolerance: the indices agree.
        assert_eq!(got_i, want_i, "{kernel:?}");
    }
}

#[test]
fn all_equal_scores_take_the_lowest_indices() {
    let (n, m, d, k) = (3, 50, 8, 7);
    let q = vec![1.0; n * d];
    let p = vec![0.5; m * d];
    for kernel in kernels() {
        let (idx, sc) = run_with(&q, &p, d, k, kernel, Plan::new(n, m, d, 4));
        for row in idx.chunks(k) {
            assert_eq!(row, &[0, 1, 2, 3, 4, 5, 6]);
        }
        assert!(sc.iter().all(|&s| s == 4.0));
    }
}

#[test]
fn public_topk_and_errors() {
    let q = int_matrix(5, 4, 7);
    let p = int_matrix(9, 4, 8);
    let qm = MatRef::new(&q, 5, 4).unwrap();
    let pm = MatRef::new(&p, 9, 4).unwrap();
    let t = topk(qm, pm, 9, Threads::Count(2)).unwrap();
    let (bi, bs) = brute(&q, &p, 4, 9);
    assert_eq!((t.indices, t.scores), (bi, bs));

    let err = |r: Result<TopK>| r.unwrap_err().to_string();
    assert!(err(topk(qm, pm, 0, Threads::Auto)).contains("k must be at least 1"));
    assert!(err(topk(qm, pm, 10, Threads::Auto)).contains("exceeds the pool's 9 rows"));
    assert!(err(topk(qm, pm, 2, Threads::Count(0))).contains("threads must be at least 1"));
    let too_many = crate::max_threads() + 1;
    assert!(err(topk(qm, pm, 2, Threads::Count(too_many))).contains("threads must be at most"));
    let p3 = MatRef::new(&p[..27], 9, 3).unwrap();
    assert!(err(topk(qm, p3, 2, Threads::Auto))
        .contains("queries have d = 4 columns but pool has d = 3"));
    let empty = MatRef::new(&[], 0, 4).unwrap();
    assert!(err(topk(empty, pm, 2, Threads::Auto)).contains("queries is empty"));
    assert!(err(topk(qm, empty, 2, Threads::Auto)).contains("pool is empty"));
    let mut bad = q.clone();
    bad[2 * 4 + 3] = f32::NAN;
    let bm = MatRef::new(&bad, 5, 4).unwrap();
    assert!(err(topk(bm, pm, 2, Threads::Auto))
        .contains("queries contain NaN or infinity (first at row 2, column 3)"));
    let mut bad = p.clone();
    bad[5] = f32::INFINITY;
    let bm = MatRef::new(&bad, 9, 4).unwrap();
    assert!(err(topk(qm, bm, 2, Threads::Auto))
        .contains("pool contains NaN or infinity (first at row 1, column 1)"));
    let huge = vec![1e20f32; 8];
    let hm = MatRef::new(&huge, 2, 4).unwrap();
    assert!(err(topk(hm, hm, 1, Threads::Auto)).contains("inner products overflow float32"));
    // Large values whose products stay finite are fine (no conservative bound).
    let big = vec![1e18f32, 0.0, 0.0, 0.0, 0.0, 1e18, 0.0, 0.0];
    let bm = MatRef::new(&big, 2, 4).unwrap();
    assert_eq!(topk(bm, bm, 1, Threads::Auto).unwrap().indices, vec![0, 1]);
    assert!(MatRef::new(&q, 4, 4)
        .unwrap_err()
        .to_string()
        .contains("needs 16 values, got 20"));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    /// Random shapes, including k = M, M below a tile, N = 1, and d that is
    /// not a multiple of the SIMD width; integers make the answer exact.
    #[test]
    fn any_shape_matches_brute_force(
        n in 1usize..80,
        m in 1usize..200,
        d in 1usize..40,
        kfrac in 0.0f64..=1.0,
        seed in any::<u64>(),
        threads in 1usize..6,
    ) {
        let k = ((kfrac * m as f64).ceil() as usize).clamp(1, m);
        let q = int_matrix(n, d, seed);
        let p = int_matrix(m, d, seed.wrapping_add(1));
        let want = brute(&q, &p, d, k);
        for kernel in kernels() {
            let got = run_with(&q, &p, d, k, kernel, Plan::new(n, m, d, threads));
            prop_assert_eq!(&got, &want);
        }
        let t = topk(MatRef::new(&q, n, d).unwrap(), MatRef::new(&p, m, d).unwrap(), k, Threads::Count(threads)).unwrap();
        prop_assert_eq!((t.indices, t.scores), want);
    }

    /// Splitting the pool across tasks and merging gives the same answer.
    #[test]
    fn pool_splits_merge_exactly(
        n in 1usize..40,
        m in 1usize..150,
        d in 1usize..20,
        k in 1usize..20,
        chunks in 1usize..7,
        seed in any::<u64>(),
    ) {
        let k = k.min(m);
        let q = int_matrix(n, d, seed);
        let p = int_matrix(m, d, seed ^ 55);
        let want = brute(&q, &p, d, k);
        let plan = Plan { query_block: 32, pool_chunks: chunks, pool_chunk: m.div_ceil(chunks) };
        for kernel in kernels() {
            prop_assert_eq!(&run_with(&q, &p, d, k, kernel, plan), &want);
        }
    }
}

#[test]
fn plans_keep_blocks_large_and_threads_busy() {
    let p = Plan::new(20_000, 100_000, 512, 2);
    assert_eq!((p.query_block, p.pool_chunks), (256, 1));
    // Few queries: split the pool, keep the block whole.
    let p = Plan::new(256, 20_000, 512, 2);
    assert_eq!((p.query_block, p.pool_chunks), (256, 8));
    let p = Plan::new(1, 100_000, 512, 2);
    assert_eq!((p.query_block, p.pool_chunks), (32, 8));
    // A small pool cannot be split: smaller blocks instead.
    let p = Plan::new(256, 3000, 512, 2);
    assert_eq!((p.query_block, p.pool_chunks), (32, 1));
    // One thread: one task per block of the largest size.
    let p = Plan::new(5000, 100_000, 128, 1);
    assert_eq!((p.query_block, p.pool_chunks), (512, 1));
}

#[test]
fn every_kernel_catches_a_single_bad_value_anywhere() {
    for kernel in kernels() {
        for (n, m, d) in [(1, 1, 1), (33, 50, 7), (70, 301, 19)] {
            let q = float_matrix(n, d, 21);
            let p = float_matrix(m, d, 22);
            for in_pool in [false, true] {
                let rows = if in_pool { m } else { n };
                for pos in [0, rows * d / 2, rows * d - 1] {
                    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                        let (mut q2, mut p2) = (q.clone(), p.clone());
                        if in_pool {
                            p2[pos] = bad
                        } else {
                            q2[pos] = bad
                        }
                        let config = TopkConfig {
                            threads: Threads::Count(3),
                            kernel,
                        };
                        let mut idx = vec![0; n];
                        let mut sc = vec![0.0; n];
                        let e = topk_into(
                            MatRef::new(&q2, n, d).unwrap(),
                            MatRef::new(&p2, m, d).unwrap(),
                            1,
                            &config,
                            &mut idx,
                            &mut sc,
                        )
                        .unwrap_err()
                        .to_string();
                        let what = if in_pool {
                            "pool contains"
                        } else {
                            "queries contain"
                        };
                        let place = format!("(first at row {}, column {})", pos / d, pos % d);
                        assert!(e.contains(what) && e.contains(&place), "{kernel:?}: {e}");
                    }
                }
            }
        }
    }
}

#[test]
fn every_kernel_catches_an_overflow_in_one_pair() {
    // Only the pair (query 40, pool row 7) overflows; every input is finite.
    let (n, m, d) = (45, 20, 5);
    let mut q = float_matrix(n, d, 31);
    let mut p = float_matrix(m, d, 32);
    q[40 * d + 2] = 3e20;
    p[7 * d + 2] = 3e20;
    for kernel in kernels() {
        let config = TopkConfig {
            threads: Threads::Count(2),
            kernel,
        };
        let (mut idx, mut sc) = (vec![0; n * 2], vec![0.0; n * 2]);
        let e = topk_into(
            MatRef::new(&q, n, d).unwrap(),
            MatRef::new(&p, m, d).unwrap(),
            2,
            &config,
            &mut idx,
            &mut sc,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("overflow float32"),
            "{kernel:?}: {e}"
        );
    }
}
