//! `otmatch`: top-k pruning and caption assignment on `.npy` files, no Python needed.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use otmatch::{npy, AssignConfig, Fallback, MatRef, Method, Threads};

#[derive(Parser)]
#[command(
    name = "otmatch",
    version,
    about = "Exact top-k pruning and caption assignment on .npy files"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// For each query row, the k pool rows with the largest inner product.
    Topk {
        /// float32 (N, d) queries (L2-normalised rows give cosine similarity).
        #[arg(long)]
        queries: PathBuf,
        /// float32 (M, d) pool.
        #[arg(long)]
        pool: PathBuf,
        /// Candidates per query (1..=M).
        #[arg(short = 'k', long = "k")]
        k: usize,
        /// int64 (N, k) output: pool indices, best first.
        #[arg(long)]
        out_indices: PathBuf,
        /// float32 (N, k) output: their scores.
        #[arg(long)]
        out_scores: PathBuf,
        /// Worker threads (default: all cores, or RAYON_NUM_THREADS).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// One caption per image from candidates and scores.
    Assign {
        /// int64 (N, k) candidate pool indices.
        #[arg(long)]
        candidates: PathBuf,
        /// float32 (N, k) candidate scores.
        #[arg(long)]
        scores: PathBuf,
        /// int64 (N,) each image's current caption (-1: none).
        #[arg(long)]
        own: Option<PathBuf>,
        /// float32 (N,) the score of each image's own caption.
        #[arg(long, requires = "own")]
        own_scores: Option<PathBuf>,
        /// argmax (captions may be shared) or capacity (at most --capacity images per caption).
        #[arg(long, value_enum, default_value_t = MethodArg::Argmax)]
        method: MethodArg,
        /// Images per caption with --method capacity.
        #[arg(long)]
        capacity: Option<usize>,
        /// Keep the own caption when own_score >= best - margin.
        #[arg(long, default_value_t = 0.0)]
        margin: f32,
        /// What an image whose candidates are all full gets.
        #[arg(long, value_enum, default_value_t = FallbackArg::Own)]
        fallback: FallbackArg,
        /// int64 (N,) output: the caption per image (-1: unassigned).
        #[arg(long)]
        out: PathBuf,
        /// Optional JSON file with the round's statistics.
        #[arg(long)]
        stats: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum MethodArg {
    Argmax,
    Capacity,
}

#[derive(Clone, Copy, ValueEnum)]
enum FallbackArg {
    Own,
    Unassigned,
}

fn matrix_shape(
    shape: &[usize],
    path: &std::path::Path,
    what: &str,
) -> Result<(usize, usize), String> {
    match shape {
        [r, c] => Ok((*r, *c)),
        _ => Err(format!(
            "{}: {what} must be 2-D, got shape {shape:?}",
            path.display()
        )),
    }
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Topk {
            queries,
            pool,
            k,
            out_indices,
            out_scores,
            threads,
        } => {
            let (qs, qv) = npy::read::<f32>(&queries).map_err(|e| e.to_string())?;
            let (ps, pv) = npy::read::<f32>(&pool).map_err(|e| e.to_string())?;
            let (n, d) = matrix_shape(&qs, &queries, "queries")?;
            let (m, dp) = matrix_shape(&ps, &pool, "pool")?;
            let q = MatRef::new(&qv, n, d).map_err(|e| e.to_string())?;
            let p = MatRef::new(&pv, m, dp).map_err(|e| e.to_string())?;
            let threads = match threads {
                Some(0) => return Err("--threads must be at least 1".into()),
                Some(t) if t > otmatch::max_threads() => {
                    return Err(format!(
                        "--threads must be at most {} (4 per core), got {t}",
                        otmatch::max_threads()
                    ))
                }
                t => Threads::from(t),
            };
            check_outputs(&[
                ("--out-indices", &out_indices),
                ("--out-scores", &out_scores),
            ])?;
            let t = otmatch::topk(q, p, k, threads).map_err(|e| e.to_string())?;
            // Both files or neither: stage both, then rename both into place.
            let a = npy::stage(&out_indices, &[n, k], &t.indices).map_err(|e| e.to_string())?;
            let b = npy::stage(&out_scores, &[n, k], &t.scores).map_err(|e| e.to_string())?;
            a.commit().map_err(|e| e.to_string())?;
            b.commit().map_err(|e| e.to_string())?;
        }
        Command::Assign {
            candidates,
            scores,
            own,
            own_scores,
            method,
            capacity,
            margin,
            fallback,
            out,
            stats,
        } => {
            let method = match (method, capacity) {
                (MethodArg::Argmax, None) => Method::Argmax,
                (MethodArg::Argmax, Some(_)) => {
                    return Err("--capacity only applies to --method capacity".into())
                }
                (MethodArg::Capacity, Some(c)) => Method::Capacity(c),
                (MethodArg::Capacity, None) => {
                    return Err("--method capacity needs --capacity C".into())
                }
            };
            let mut outputs = vec![("--out", out.as_path())];
            if let Some(p) = &stats {
                outputs.push(("--stats", p.as_path()));
            }
            check_outputs(&outputs)?;
            let (cs, cv) = npy::read::<i64>(&candidates).map_err(|e| e.to_string())?;
            let (ss, sv) = npy::read::<f32>(&scores).map_err(|e| e.to_string())?;
            let (n, k) = matrix_shape(&cs, &candidates, "candidates")?;
            if ss != cs {
                return Err(format!(
                    "{}: scores must have the shape of candidates {cs:?}, got {ss:?}",
                    scores.display()
                ));
            }
            let own_v = own
                .as_ref()
                .map(|p| read_vector::<i64>(p, n, "own"))
                .transpose()?;
            let own_s = own_scores
                .as_ref()
                .map(|p| read_vector::<f32>(p, n, "own scores"))
                .transpose()?;
            let config = AssignConfig {
                method,
                margin,
                fallback: match fallback {
                    FallbackArg::Own => Fallback::Own,
                    FallbackArg::Unassigned => Fallback::Unassigned,
                },
            };
            let a = otmatch::assign(&cv, &sv, k, own_v.as_deref(), own_s.as_deref(), &config)
                .map_err(|e| e.to_string())?;
            // The assignment and its statistics, both or neither.
            let staged_out = npy::stage(&out, &[n], &a.caption).map_err(|e| e.to_string())?;
            let staged_stats = match stats {
                Some(path) => {
                    let s = a.stats;
                    let json = format!(
                        "{{\"n\": {}, \"changed\": {}, \"distinct\": {}, \"max_load\": {}, \"unassigned\": {}, \"kept_by_margin\": {}}}\n",
                        s.n, s.changed, s.distinct, s.max_load, s.unassigned, s.kept_by_margin
                    );
                    Some(
                        npy::stage_atomic(&path, |w| w.write_all(json.as_bytes()))
                            .map_err(|e| e.to_string())?,
                    )
                }
                None => None,
            };
            staged_out.commit().map_err(|e| e.to_string())?;
            if let Some(staged) = staged_stats {
                staged.commit().map_err(|e| e.to_string())?;
            }
        }
    }
    Ok(())
}

/// Refuses, before any work, output paths that cannot be written or that name the
/// same file twice (the second write would silently replace the first).
fn check_outputs(outputs: &[(&str, &std::path::Path)]) -> Result<(), String> {
    for (i, (flag, path)) in outputs.iter().enumerate() {
        npy::check_output(path).map_err(|e| format!("{flag}: {e}"))?;
        for (other_flag, other) in &outputs[..i] {
            if same_file(path, other) {
                return Err(format!(
                    "{other_flag} and {flag} both name {}: give each output its own file",
                    path.display()
                ));
            }
        }
    }
    Ok(())
}

fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    let absolute = |p: &std::path::Path| {
        let dir = p.parent().filter(|d| !d.as_os_str().is_empty());
        let dir = dir.map_or_else(|| std::path::PathBuf::from("."), |d| d.to_path_buf());
        dir.canonicalize()
            .ok()
            .map(|d| d.join(p.file_name().unwrap_or_default()))
    };
    a == b || matches!((absolute(a), absolute(b)), (Some(x), Some(y)) if x == y)
}

fn read_vector<T: npy::Element>(
    path: &std::path::Path,
    n: usize,
    what: &str,
) -> Result<Vec<T>, String> {
    let (shape, v) = npy::read::<T>(path).map_err(|e| e.to_string())?;
    if shape != [n] {
        return Err(format!(
            "{}: {what} must have shape ({n},), got {shape:?}",
            path.display()
        ));
    }
    Ok(v)
}

fn main() -> ExitCode {
    // A bug must still end in a one-line message and exit code 2, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("otmatch: internal error: {info}");
    }));
    let cli = Cli::parse();
    match std::panic::catch_unwind(|| run(cli)) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(msg)) => {
            eprintln!("otmatch: error: {msg}");
            ExitCode::from(2)
        }
        Err(_) => ExitCode::from(2),
    }
}
