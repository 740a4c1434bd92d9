//! Row-parallel loops over scoped threads (no thread pool dependency).

/// Calls `f(begin, end)` for contiguous chunks of `0..n` on up to `available_parallelism`
/// threads. Chunks are disjoint, so `f` may write the rows it is given.
pub fn for_row_chunks(n: usize, min_rows_per_thread: usize, f: impl Fn(usize, usize) + Sync) {
    let threads = std::thread::available_parallelism()
        .map(|p| p.get())
        .unwrap_or(1);
    let threads = threads.min(n / min_rows_per_thread.max(1)).max(1);
    if threads == 1 {
        f(0, n);
        return;
    }
    let chunk = n.div_ceil(threads);
    std::thread::scope(|s| {
        for t in 0..threads {
            let (b, e) = (t * chunk, ((t + 1) * chunk).min(n));
            if b < e {
                let f = &f;
                s.spawn(move || f(b, e));
            }
        }
    });
}
