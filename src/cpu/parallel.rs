//! Row-parallel loops on a small persistent worker pool (std only, no thread pool dependency).
//!
//! `available_parallelism − 1` workers are started once, on first use, and park on a condition
//! variable between jobs; the calling thread takes part in every job. Threads that live across
//! calls keep their malloc arenas and thread-local buffers warm: with threads spawned per call,
//! glibc retained about 20 MiB of freed per-thread buffers in fresh arenas on every fused
//! linear call (docs/perf.md). One caller at a time uses the pool; a concurrent caller (or a
//! nested loop inside a job) runs its chunks on its own thread, with the same chunk boundaries,
//! so results never depend on which thread ran what; so does a child process made by `fork`.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock, TryLockError};

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

/// A job's task body with its borrow erased: valid only while the job is posted (the caller
/// waits for every task to finish before it returns, see `Pool::run`).
#[derive(Clone, Copy)]
struct TaskFn(*const (dyn Fn(usize) + Sync + 'static));
// The pointee is `Sync`, and it outlives every use (see above).
unsafe impl Send for TaskFn {}

/// The posted job, if any, and its progress.
struct State {
    job: Option<TaskFn>,
    /// Tasks `next..tasks` are not yet claimed.
    next: usize,
    tasks: usize,
    /// Tasks claimed and still running.
    running: usize,
    /// A task of this job panicked.
    panicked: bool,
}

impl State {
    /// Claims the next task of the posted job.
    fn claim(&mut self) -> Option<(TaskFn, usize)> {
        let job = self.job?;
        if self.next >= self.tasks {
            return None;
        }
        self.next += 1;
        self.running += 1;
        Some((job, self.next - 1))
    }
}

struct Pool {
    state: Mutex<State>,
    /// Workers wait here for a job.
    posted: Condvar,
    /// The caller waits here for the last task to finish.
    finished: Condvar,
    /// Held by the one caller whose job the pool runs.
    busy: Mutex<()>,
    /// Workers started.
    workers: AtomicUsize,
    /// The process that started them: a child made by `fork` has none of them, and its copy
    /// of the locks may be held by a thread that does not exist there, so it runs inline.
    pid: u32,
}

/// Poisoning cannot leave `State` inconsistent (tasks run outside the lock, and panics are
/// caught), so a poisoned lock is simply taken.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Pool {
    /// The process-wide pool, its workers started on first use. A worker that cannot be
    /// started (resource limits) is simply missing: its share runs on the other threads.
    fn get() -> &'static Pool {
        static POOL: OnceLock<&'static Pool> = OnceLock::new();
        POOL.get_or_init(|| {
            let want = std::thread::available_parallelism()
                .map(|p| p.get())
                .unwrap_or(1)
                - 1;
            let pool: &'static Pool = Box::leak(Box::new(Pool {
                state: Mutex::new(State {
                    job: None,
                    next: 0,
                    tasks: 0,
                    running: 0,
                    panicked: false,
                }),
                posted: Condvar::new(),
                finished: Condvar::new(),
                busy: Mutex::new(()),
                workers: AtomicUsize::new(0),
                pid: std::process::id(),
            }));
            let mut started = 0;
            for i in 0..want {
                let spawned = std::thread::Builder::new()
                    .name(format!("calibrl-{i}"))
                    .spawn(move || pool.work());
                if spawned.is_ok() {
                    started += 1;
                }
            }
            pool.workers.store(started, Ordering::Relaxed);
            pool
        })
    }

    /// A worker's loop: run tasks of posted jobs, park in between.
    fn work(&self) {
        // A thread-local with a destructor keeps glibc from unmapping this library while the
        // thread exists (dlclose waits for pending TLS destructors), so a parked worker never
        // returns into unloaded code.
        thread_local!(static PIN: PinLibrary = const { PinLibrary });
        PIN.with(|_| {});
        let mut st = lock(&self.state);
        loop {
            match st.claim() {
                Some(task) => st = self.run_task(st, task),
                None => st = self.posted.wait(st).unwrap_or_else(|p| p.into_inner()),
            }
        }
    }

    /// Runs one claimed task outside the lock and records its end.
    fn run_task<'a>(
        &'a self,
        st: MutexGuard<'a, State>,
        (f, i): (TaskFn, usize),
    ) -> MutexGuard<'a, State> {
        drop(st);
        // SAFETY: the job is still posted: its caller waits until `running` is back to 0.
        let ok = catch_unwind(AssertUnwindSafe(|| unsafe { (*f.0)(i) })).is_ok();
        let mut st = lock(&self.state);
        st.running -= 1;
        st.panicked |= !ok;
        if st.running == 0 && st.next >= st.tasks {
            self.finished.notify_all();
        }
        st
    }

    /// Runs `f(0..tasks)` on the workers and the calling thread; returns once every task has
    /// finished. `None` when another caller holds the pool (the caller then runs inline).
    fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) -> Option<()> {
        let _busy = match self.busy.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return None,
        };
        // SAFETY: only the lifetime is erased; `f` is not used after this function returns
        // (every claimed task has finished and the job is withdrawn below, under the lock).
        let erased: *const (dyn Fn(usize) + Sync + 'static) = unsafe { std::mem::transmute(f) };
        let mut st = lock(&self.state);
        *st = State {
            job: Some(TaskFn(erased)),
            next: 0,
            tasks,
            running: 0,
            panicked: false,
        };
        self.posted.notify_all();
        while let Some(task) = st.claim() {
            st = self.run_task(st, task);
        }
        while st.running > 0 {
            st = self.finished.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.job = None;
        let panicked = st.panicked;
        drop(st);
        if panicked {
            // As a scoped thread's panic would: the C ABI's catch_unwind turns it into an error.
            resume_unwind(Box::new("a parallel task panicked"));
        }
        Some(())
    }
}

/// See `Pool::work`.
struct PinLibrary;
impl Drop for PinLibrary {
    fn drop(&mut self) {}
}

/// Calls `f(begin, end)` for contiguous chunks of `0..n` on up to `available_parallelism`
/// threads. Chunks are disjoint, so `f` may write the rows it is given.
pub fn for_row_chunks(n: usize, min_rows_per_thread: usize, f: impl Fn(usize, usize) + Sync) {
    let (threads, chunk) = split(n, min_rows_per_thread);
    if threads == 1 {
        f(0, n);
        return;
    }
    let task = |t: usize| {
        let (b, e) = (t * chunk, ((t + 1) * chunk).min(n));
        if b < e {
            f(b, e);
        }
    };
    let pool = Pool::get();
    let usable = pool.workers.load(Ordering::Relaxed) > 0 && pool.pid == std::process::id();
    if !usable || pool.run(threads, &task).is_none() {
        (0..threads).for_each(task);
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_once_from_concurrent_and_nested_callers() {
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for n in [1, 2, 3, 17, 1000] {
                        let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                        for_row_chunks(n, 1, |b, e| {
                            for_row_chunks(e - b, 1, |bb, ee| {
                                for i in b + bb..b + ee {
                                    hits[i].fetch_add(1, Ordering::Relaxed);
                                }
                            })
                        });
                        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
                    }
                });
            }
        });
    }

    #[test]
    fn a_panicking_chunk_reaches_the_caller_and_the_pool_still_works() {
        let r = catch_unwind(|| for_row_chunks(64, 1, |b, _| assert!(b != 0, "chunk 0")));
        assert!(r.is_err());
        let total = AtomicUsize::new(0);
        for_row_chunks(64, 1, |b, e| {
            total.fetch_add(e - b, Ordering::Relaxed);
        });
        assert_eq!(total.load(Ordering::Relaxed), 64);
    }
}
