//! Worker pools that survive `fork()`.
//!
//! torch's DataLoader forks worker processes. rayon's threads do not survive a
//! fork: a child that touches a pool its parent started waits forever for
//! threads that do not exist. So every pool here is stamped with the id of the
//! process that started it, and a process that finds a stamp not its own starts
//! a fresh pool (and never touches, joins or drops the dead one).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rayon::ThreadPool;

use crate::error::{Error, Result};

/// How many threads a call may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Threads {
    /// rayon's global pool (all cores, or `RAYON_NUM_THREADS`); in a forked
    /// child of a process that used it, a fresh pool of the same size.
    #[default]
    Auto,
    /// A dedicated pool of exactly this many threads (1..=[`max_threads`]),
    /// started once per process and reused by later calls with the same count
    /// (the two most recently started counts are kept).
    Count(usize),
}

impl From<Option<usize>> for Threads {
    fn from(t: Option<usize>) -> Self {
        t.map_or(Threads::Auto, Threads::Count)
    }
}

/// The process that first used rayon's global pool (0: none yet).
static GLOBAL_OWNER: AtomicU32 = AtomicU32::new(0);

struct Pools {
    pid: u32,
    by_count: HashMap<usize, Arc<ThreadPool>>,
    /// The counts in `by_count`, oldest first.
    order: Vec<usize>,
    fallback: Option<Arc<ThreadPool>>,
}

static POOLS: Mutex<Option<Pools>> = Mutex::new(None);

fn lock_pools() -> MutexGuard<'static, Option<Pools>> {
    // A panic while holding this lock cannot leave the map inconsistent.
    POOLS.lock().unwrap_or_else(|e| e.into_inner())
}

/// The pools of this process; those inherited through fork are forgotten, not dropped.
fn pools_of_this_process(guard: &mut Option<Pools>) -> &mut Pools {
    let pid = std::process::id();
    if guard.as_ref().is_some_and(|p| p.pid != pid) {
        if let Some(stale) = guard.take() {
            // Dropping would signal threads that only exist in the parent.
            std::mem::forget(stale);
        }
    }
    guard.get_or_insert_with(|| Pools {
        pid,
        by_count: HashMap::new(),
        order: Vec::new(),
        fallback: None,
    })
}

fn build(n: usize) -> Result<Arc<ThreadPool>> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("otmatch-{i}"))
        .build()
        .map(Arc::new)
        .map_err(|e| Error::ThreadPool(e.to_string()))
}

/// The size rayon's global pool would have: `RAYON_NUM_THREADS` or the core count.
fn default_size() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The largest thread count a call may ask for: four per core, and at least 8.
///
/// The kernel is compute-bound, so threads beyond the cores only add switching
/// (3000 threads on 2 cores ran 100x slower); a count far above this is a
/// mistake, refused rather than honoured with thousands of OS threads.
pub fn max_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cores.saturating_mul(4).max(8)
}

/// Dedicated pools kept alive at once; asking for another count retires the oldest.
const KEPT_POOLS: usize = 2;

/// The pool a call with `threads` runs on; `None` means rayon's global pool.
fn pool_for(threads: Threads) -> Result<Option<Arc<ThreadPool>>> {
    let pid = std::process::id();
    match threads {
        Threads::Count(0) => Err(Error::invalid("threads must be at least 1, got 0")),
        Threads::Count(n) if n > max_threads() => Err(Error::invalid(format!(
            "threads must be at most {} (4 per core of the {} available), got {n}",
            max_threads(),
            std::thread::available_parallelism().map_or(1, |n| n.get())
        ))),
        Threads::Count(n) => {
            let mut guard = lock_pools();
            let pools = pools_of_this_process(&mut guard);
            if let Some(p) = pools.by_count.get(&n) {
                return Ok(Some(Arc::clone(p)));
            }
            let p = build(n)?;
            // Bound the pools alive: each distinct count used to add one for good.
            // A retired pool's threads end once no running call holds its Arc.
            while pools.order.len() >= KEPT_POOLS {
                let oldest = pools.order.remove(0);
                pools.by_count.remove(&oldest);
            }
            pools.by_count.insert(n, Arc::clone(&p));
            pools.order.push(n);
            Ok(Some(p))
        }
        Threads::Auto => {
            let owner =
                match GLOBAL_OWNER.compare_exchange(0, pid, Ordering::SeqCst, Ordering::SeqCst) {
                    Ok(_) => pid,
                    Err(current) => current,
                };
            if owner == pid {
                return Ok(None);
            }
            let mut guard = lock_pools();
            let pools = pools_of_this_process(&mut guard);
            if let Some(p) = &pools.fallback {
                return Ok(Some(Arc::clone(p)));
            }
            let p = build(default_size())?;
            pools.fallback = Some(Arc::clone(&p));
            Ok(Some(p))
        }
    }
}

/// Runs `f` with rayon's parallel iterators bound to the pool chosen by `threads`.
pub(crate) fn run_in_pool<R, F>(threads: Threads, f: F) -> Result<R>
where
    F: FnOnce() -> R + Send,
    R: Send,
{
    match pool_for(threads)? {
        Some(pool) => Ok(pool.install(f)),
        None => Ok(f()),
    }
}

/// How many threads a call with `threads` would use (an error for a count out of range).
pub fn thread_count(threads: Threads) -> Result<usize> {
    match pool_for(threads)? {
        Some(pool) => Ok(pool.current_num_threads()),
        None => Ok(rayon::current_num_threads()),
    }
}
