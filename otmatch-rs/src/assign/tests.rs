use std::collections::HashMap;

use proptest::prelude::*;

use super::*;

/// The rule written as plainly as possible: sort every (image, candidate)
/// entry globally, walk it once.
fn reference(
    cands: &[i64],
    scores: &[f32],
    k: usize,
    own: Option<&[i64]>,
    own_scores: Option<&[f32]>,
    config: &AssignConfig,
) -> (Vec<i64>, Vec<f32>, usize) {
    let n = cands.len() / k;
    let ranked: Vec<Vec<(i64, f32)>> = (0..n)
        .map(|i| {
            let mut row: Vec<(i64, f32)> = (0..k)
                .map(|e| (cands[i * k + e], scores[i * k + e]))
                .collect();
            row.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap().then(a.0.cmp(&b.0)));
            row
        })
        .collect();
    let own_of = |i: usize| own.map_or(-1, |o| o[i]);
    let own_score: Vec<Option<f32>> = (0..n)
        .map(|i| {
            let o = own_of(i);
            if o < 0 {
                return None;
            }
            match own_scores {
                Some(os) => Some(os[i]).filter(|s| s.is_finite()),
                None => ranked[i]
                    .iter()
                    .filter(|e| e.0 == o)
                    .map(|e| e.1)
                    .reduce(f32::max),
            }
        })
        .collect();
    let keep: Vec<bool> = (0..n)
        .map(|i| own_score[i].is_some_and(|s| s >= ranked[i][0].1 - config.margin))
        .collect();
    let mut caption = vec![-1i64; n];
    let mut score = vec![f32::NAN; n];
    let mut kept = 0;
    match config.method {
        Method::Argmax => {
            for i in 0..n {
                if keep[i] {
                    caption[i] = own_of(i);
                    score[i] = own_score[i].unwrap();
                    kept += usize::from(ranked[i][0].0 != own_of(i));
                } else {
                    caption[i] = ranked[i][0].0;
                    score[i] = ranked[i][0].1;
                }
            }
        }
        Method::Capacity(cap) => {
            let mut load: HashMap<i64, usize> = HashMap::new();
            let mut keepers: Vec<usize> = (0..n).filter(|&i| keep[i]).collect();
            keepers.sort_by(|&a, &b| {
                own_score[b]
                    .unwrap()
                    .partial_cmp(&own_score[a].unwrap())
                    .unwrap()
                    .then(a.cmp(&b))
            });
            for i in keepers {
                let o = own_of(i);
                let l = load.entry(o).or_insert(0);
                if *l < cap {
                    *l += 1;
                    caption[i] = o;
                    score[i] = own_score[i].unwrap();
                    kept += usize::from(ranked[i][0].0 != o);
                }
            }
            let mut entries: Vec<(f32, usize, usize)> = (0..n)
                .flat_map(|i| (0..k).map(move |r| (0.0, i, r)))
                .map(|(_, i, r)| (ranked[i][r].1, i, r))
                .collect();
            entries.sort_by(|a, b| {
                b.0.partial_cmp(&a.0)
                    .unwrap()
                    .then(a.1.cmp(&b.1))
                    .then(a.2.cmp(&b.2))
            });
            for (s, i, r) in entries {
                let c = ranked[i][r].0;
                let l = load.entry(c).or_insert(0);
                if caption[i] < 0 && *l < cap {
                    *l += 1;
                    caption[i] = c;
                    score[i] = s;
                }
            }
            if config.fallback == Fallback::Own {
                for i in 0..n {
                    if caption[i] < 0 && own_of(i) >= 0 {
                        caption[i] = own_of(i);
                        score[i] = own_score[i].unwrap_or(f32::NAN);
                    }
                }
            }
        }
    }
    (caption, score, kept)
}

fn same_scores(a: &[f32], b: &[f32]) -> bool {
    a.iter()
        .zip(b)
        .all(|(x, y)| x == y || (x.is_nan() && y.is_nan()))
}

#[test]
fn argmax_picks_the_best_and_breaks_ties_by_lower_index() {
    let cands = [5, 3, 9, 2, 2, 7];
    let scores = [0.5, 0.5, 0.1, 0.2, 0.9, 0.9];
    let a = assign(&cands, &scores, 3, None, None, &AssignConfig::default()).unwrap();
    assert_eq!(a.caption, vec![3, 2]);
    assert_eq!(a.score, vec![0.5, 0.9]);
    assert_eq!(a.changed, vec![false, false]);
    assert_eq!(
        a.stats,
        AssignStats {
            n: 2,
            changed: 0,
            distinct: 2,
            max_load: 1,
            unassigned: 0,
            kept_by_margin: 0
        }
    );
}

#[test]
fn margin_keeps_own_within_reach_only() {
    // Image 0: own 4 scores 0.80 (given), best 0.84 -> kept with margin 0.05.
    // Image 1: own 6 is a candidate at 0.5, best 0.9 -> changes.
    let cands = [1, 2, 6, 3];
    let scores = [0.84, 0.1, 0.5, 0.9];
    let own = [4, 6];
    let own_scores = [0.80, f32::NAN];
    let cfg = AssignConfig {
        margin: 0.05,
        ..Default::default()
    };
    // NaN own score where own >= 0 is refused...
    assert!(assign(&cands, &scores, 2, Some(&own), Some(&own_scores), &cfg).is_err());
    // ...so give it, or let it be read from the candidates.
    let a = assign(&cands, &scores, 2, Some(&own), Some(&[0.80, 0.5]), &cfg).unwrap();
    assert_eq!(a.caption, vec![4, 3]);
    assert_eq!(a.changed, vec![false, true]);
    assert_eq!(a.stats.kept_by_margin, 1);
    assert_eq!(a.stats.changed, 1);
    // Without own_scores image 0's own caption is unknown: it cannot be kept.
    let a = assign(&cands, &scores, 2, Some(&own), None, &cfg).unwrap();
    assert_eq!(a.caption, vec![1, 3]);
    assert_eq!(a.stats.kept_by_margin, 0);
}

#[test]
fn capacity_spreads_a_crowd_and_falls_back() {
    // Three images all prefer caption 7; capacity 1.
    let cands = [7, 1, 7, 2, 7, 1];
    let scores = [0.9, 0.3, 0.8, 0.7, 0.95, 0.2];
    let own = [10, 11, 12];
    let cfg = AssignConfig {
        method: Method::Capacity(1),
        ..Default::default()
    };
    let a = assign(&cands, &scores, 2, Some(&own), None, &cfg).unwrap();
    // Image 2 (0.95) takes 7, image 1 takes 2 (0.7), image 0 takes 1 (0.3).
    assert_eq!(a.caption, vec![1, 2, 7]);
    // Four images on two captions: image 3 has no room anywhere.
    let cands = [7, 1, 7, 1, 7, 1, 7, 1];
    let scores = [0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4];
    let own = [10, 11, 12, -1];
    let a = assign(&cands, &scores, 2, Some(&own), None, &cfg).unwrap();
    // 7 goes to image 0 (0.9); 1 to image 3 (0.4 beats 0.3 and 0.2); images 1
    // and 2 find both full and keep their own captions.
    assert_eq!(a.caption, vec![7, 11, 12, 1]);
    assert_eq!(a.changed, vec![true, false, false, true]);
    assert_eq!(a.stats.unassigned, 0);
    let cfg_u = AssignConfig {
        fallback: Fallback::Unassigned,
        ..cfg
    };
    let a = assign(&cands, &scores, 2, Some(&own), None, &cfg_u).unwrap();
    assert_eq!(a.caption, vec![7, -1, -1, 1]);
    assert!(a.score[1].is_nan());
    assert_eq!(a.score[3], 0.4);
    assert_eq!(a.stats.unassigned, 2);
    assert_eq!(a.stats.max_load, 1);
}

#[test]
fn bad_input_is_named() {
    let c = [0i64, 1, 2, 3];
    let s = [0.1f32, 0.2, 0.3, 0.4];
    let d = AssignConfig::default();
    let e = |r: Result<Assignment>| r.unwrap_err().to_string();
    assert!(e(assign(&c, &s, 0, None, None, &d)).contains("at least one column"));
    assert!(e(assign(&c, &s, 3, None, None, &d)).contains("do not make rows of k = 3"));
    assert!(e(assign(&[], &[], 2, None, None, &d)).contains("empty"));
    assert!(e(assign(&c, &s[..3], 2, None, None, &d)).contains("shape of candidates"));
    assert!(
        e(assign(&[0, -1, 2, 3], &s, 2, None, None, &d)).contains("found -1 at row 0, column 1")
    );
    assert!(
        e(assign(&c, &[0.1, 0.2, f32::NAN, 0.4], 2, None, None, &d)).contains("row 1, column 0")
    );
    assert!(e(assign(&c, &s, 2, Some(&[1]), None, &d)).contains("one entry per image (2)"));
    assert!(e(assign(&c, &s, 2, Some(&[1, -2]), None, &d)).contains("found -2"));
    assert!(e(assign(&c, &s, 2, None, Some(&[0.1, 0.2]), &d)).contains("without own"));
    let neg = AssignConfig { margin: -0.1, ..d };
    assert!(e(assign(&c, &s, 2, None, None, &neg)).contains("margin must be finite and >= 0"));
    let zero = AssignConfig {
        method: Method::Capacity(0),
        ..d
    };
    assert!(e(assign(&c, &s, 2, None, None, &zero)).contains("capacity must be at least 1"));
}

#[test]
fn sparse_pool_indices_use_the_hash_map() {
    let big = 1i64 << 50;
    let cands = [big, 3, big, 4];
    let scores = [0.9, 0.1, 0.8, 0.2];
    let cfg = AssignConfig {
        method: Method::Capacity(1),
        ..Default::default()
    };
    let a = assign(&cands, &scores, 2, None, None, &cfg).unwrap();
    assert_eq!(a.caption, vec![big, 4]);
    assert_eq!(a.stats.distinct, 2);
}

fn arb_case() -> impl Strategy<Value = (usize, usize, Vec<i64>, Vec<f32>, Vec<i64>, Vec<f32>)> {
    (1usize..40, 1usize..6, 1i64..15).prop_flat_map(|(n, k, pool)| {
        (
            Just(n),
            Just(k),
            prop::collection::vec(0..pool, n * k),
            // Scores on a coarse grid: many ties.
            prop::collection::vec((0i32..6).prop_map(|v| v as f32 * 0.25), n * k),
            prop::collection::vec(-1..pool, n),
            prop::collection::vec(
                (0i32..7).prop_map(|v| {
                    if v == 6 {
                        f32::NEG_INFINITY
                    } else {
                        v as f32 * 0.25
                    }
                }),
                n,
            ),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, .. ProptestConfig::default() })]

    #[test]
    fn matches_the_plain_rule(
        (n, k, cands, scores, own, own_scores) in arb_case(),
        cap in 1usize..4,
        margin in prop::sample::select(vec![0.0f32, 0.25, 0.5]),
        use_own in any::<bool>(),
        use_own_scores in any::<bool>(),
        capacity in any::<bool>(),
        unassigned in any::<bool>(),
    ) {
        let own = use_own.then_some(own.as_slice());
        let own_scores = (use_own && use_own_scores).then_some(own_scores.as_slice());
        let config = AssignConfig {
            method: if capacity { Method::Capacity(cap) } else { Method::Argmax },
            margin,
            fallback: if unassigned { Fallback::Unassigned } else { Fallback::Own },
        };
        let got = assign(&cands, &scores, k, own, own_scores, &config).unwrap();
        let (caption, score, kept) = reference(&cands, &scores, k, own, own_scores, &config);
        prop_assert_eq!(&got.caption, &caption);
        prop_assert!(same_scores(&got.score, &score));
        prop_assert_eq!(got.stats.kept_by_margin, kept);
        prop_assert_eq!(got.stats.n, n);
        prop_assert_eq!(got.stats.unassigned, caption.iter().filter(|&&c| c < 0).count());
        if let Method::Capacity(c) = config.method {
            // Only the fallback to the own caption may exceed the capacity.
            if config.fallback == Fallback::Unassigned {
                prop_assert!(got.stats.max_load <= c);
            }
        }
        let changed: Vec<bool> = match own {
            Some(o) => caption.iter().zip(o).map(|(a, b)| a != b).collect(),
            None => vec![false; n],
        };
        prop_assert_eq!(got.changed, changed);
    }
}
