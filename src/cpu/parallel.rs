//! Row-parallel loops over scoped threads (no thread pool dependency).

use std::sync::Mutex;

/// Scratch memory could not be allocated.
#[derive(Debug)]
pub struct OutOfMemory;

/// How many threads (and rows per chunk) `for_row_chunks` uses for `n` rows.
fn split(n: usize, min_rows_per_thread: usize) -> (usize, usize) {
    let threads = std::thread::available_parallelism()
        .map(|p| p.get())
        .unwrap_or(1);
    let threads = threads.min(n / min_rows_per_thread.max(1)).max(1);
    (threads, n.div_ceil(threads).max(1))
}

/// Calls `f(begin, end)` for contiguous chunks of `0..n` on up to `available_parallelism`
/// threads. Chunks are disjoint, so `f` may write the rows it is given.
pub fn for_row_chunks(n: usize, min_rows_per_thread: usize, f: impl Fn(usize, usize) + Sync) {
    let (threads, chunk) = split(n, min_rows_per_thread);
    if threads == 1 {
        f(0, n);
        return;
    }
    std::thread::scope(|s| {
        for t in 0..threads {
            let (b, e) = (t * chunk, ((t + 1) * chunk).min(n));
            if b < e {
                let f = &f;
                // A thread that cannot be started (resource limits) runs its chunk here.
                if std::thread::Builder::new()
                    .spawn_scoped(s, move || f(b, e))
                    .is_err()
                {
                    f(b, e);
                }
            }
        }
    });
}

/// `for_row_chunks` that also hands each chunk its own scratch buffer of `scratch_len` f32.
/// Every buffer is allocated before any chunk runs: when the memory cannot be had, nothing
/// has been touched and the result is `Err(OutOfMemory)`.
pub fn for_row_chunks_with_scratch(
    n: usize,
    min_rows_per_thread: usize,
    scratch_len: usize,
    f: impl Fn(usize, usize, &mut [f32]) + Sync,
) -> Result<(), OutOfMemory> {
    if n == 0 {
        return Ok(());
    }
    let (threads, chunk) = split(n, min_rows_per_thread);
    let mut pool = Vec::new();
    pool.try_reserve_exact(threads).map_err(|_| OutOfMemory)?;
    for _ in 0..threads {
        let mut v = Vec::new();
        v.try_reserve_exact(scratch_len).map_err(|_| OutOfMemory)?;
        v.resize(scratch_len, 0f32);
        pool.push(Mutex::new(v));
    }
    for_row_chunks(n, min_rows_per_thread, |b, e| {
        // Each chunk locks only its own buffer: never contended.
        let mut scratch = pool[b / chunk].lock().unwrap_or_else(|p| p.into_inner());
        f(b, e, &mut scratch)
    });
    Ok(())
}
