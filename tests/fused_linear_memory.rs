//! Working memory of the fused linear path (issue 27: "peak extra memory ≤ chunk·V·4 bytes +
//! O(N·H)"): a counting global allocator records the heap peak of each call beyond what was
//! live before it, with the workspace and every output allocated by the caller. What the
//! library itself allocates must not grow with V·H (no copy of the weight or of `d_weight`),
//! and must stay within O(N·H) plus, per thread, a row of V float32 and the GEMMs' bounded
//! blocks. Its own test binary: the global allocator counts every allocation of the process.

mod common;

use calibrl::ffi::linear::*;
use common::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Ordering::SeqCst) + l.size();
            PEAK.fetch_max(now, Ordering::SeqCst);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        LIVE.fetch_sub(l.size(), Ordering::SeqCst);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The tests of this binary run one at a time (the counters are process-wide).
static SERIAL: Mutex<()> = Mutex::new(());

/// Heap bytes allocated by `f` beyond what was live when it started, at its peak.
fn peak_extra(f: impl FnOnce()) -> usize {
    let before = LIVE.load(Ordering::SeqCst);
    PEAK.store(before, Ordering::SeqCst);
    f();
    PEAK.load(Ordering::SeqCst) - before
}

#[derive(Clone, Copy, Debug)]
enum Call {
    Forward,
    BackwardAccumulate,
    ForwardBackward,
}

/// Heap peak of one call (after a warm-up call with the same shapes).
fn measure(call: Call, (n, h, v): (usize, usize, usize), chunk: usize, dt: Dt) -> usize {
    let mut rng = Rng::new(7);
    let hidden: Vec<f64> = (0..n * h).map(|_| rng.normal()).collect();
    let weight: Vec<f64> = (0..v * h).map(|_| 0.1 * rng.normal()).collect();
    let labels: Vec<i64> = (0..n).map(|_| rng.int(0, v) as i64).collect();
    let g: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
    let hid = Tensor::new(&hidden, &[n, h], dt);
    let w = Tensor::new(&weight, &[v, h], dt);
    let lab = Tensor::ints(&labels, &[n], Dt::I64);
    let (gt, ht) = (
        Tensor::new(&g, &[n], Dt::F32),
        Tensor::new(&g, &[n], Dt::F32),
    );
    let mut bytes = 0usize;
    let st = unsafe {
        calibrl_fused_linear_workspace_size(hid.lib(), w.lib(), chunk as i64, &mut bytes)
    };
    assert_eq!(st as i32, 0);
    let mut ws = Tensor::filled(0.0, &[bytes + 16], Dt::U8);
    let off = (16 - (ws.desc.data as usize % 16)) % 16; // 16-byte aligned, as the ABI asks
    ws.desc.byte_offset = off as u64;
    ws.set_shape(&[bytes]);
    let mut lp = Tensor::filled(0.0, &[n], Dt::F32);
    let mut en = Tensor::filled(0.0, &[n], Dt::F32);
    let mut ls = Tensor::filled(0.0, &[n], Dt::F32);
    let mut dh = Tensor::filled(0.0, &[n, h], dt);
    let mut dw = Tensor::filled(0.0, &[v, h], Dt::F32);
    let mut run = || {
        let input = CalibrlLinearInput {
            hidden: hid.lib(),
            weight: w.lib(),
            bias: std::ptr::null(),
            labels: lab.lib(),
            temperature: 1.0,
            vocab_start: 0,
            chunk_size: chunk as i64,
            workspace: ws.lib_mut(),
        };
        let null = std::ptr::null_mut();
        let st = unsafe {
            match call {
                Call::Forward => calibrl_fused_linear_forward(
                    &input,
                    lp.lib_mut(),
                    en.lib_mut(),
                    ls.lib_mut(),
                    null,
                ),
                Call::BackwardAccumulate => calibrl_fused_linear_backward(
                    &input,
                    ls.lib(),
                    en.lib(),
                    gt.lib(),
                    ht.lib(),
                    dh.lib_mut(),
                    dw.lib_mut(),
                    std::ptr::null_mut(),
                    1,
                    null,
                ),
                Call::ForwardBackward => calibrl_fused_linear_forward_backward(
                    &input,
                    gt.lib(),
                    ht.lib(),
                    lp.lib_mut(),
                    en.lib_mut(),
                    ls.lib_mut(),
                    dh.lib_mut(),
                    dw.lib_mut(),
                    std::ptr::null_mut(),
                    0,
                    null,
                ),
            }
        };
        assert_eq!(st as i32, 0, "{call:?}: {}", last_error());
    };
    run(); // warm-up (and the saved lse / entropy for the backward)
           // The worker threads' thread-local buffers (the gemm crate's) are freed by their TLS
           // destructors, which may run after the scope has joined: let them finish first, so that
           // their frees do not land inside the measured call.
    std::thread::sleep(std::time::Duration::from_millis(100));
    peak_extra(run)
}

/// What the gemm crate may hold per thread during one GEMM: its thread-local slab of one L2
/// cache (1 MiB here; ≤ 2 MiB on current x86-64) and a packed block of at most
/// kc × max(chunk, vocabulary block) float32 with kc ≤ 512 (≤ 4 MiB for the block sizes of
/// src/cpu/linear/gemm.rs). Measured: ≤ 3 MiB per thread at N = 1024, H = 512, V = 32000, chunk 256.
const GEMM_PER_THREAD: usize = 8 << 20;

extern "C" {
    fn sched_getaffinity(pid: i32, size: usize, mask: *mut u64) -> i32;
    fn sched_setaffinity(pid: i32, size: usize, mask: *const u64) -> i32;
}

/// Restricts this thread (and the threads it starts) to at most two of its CPUs, so that the
/// per-thread terms of the bound stay small next to a `[V, H]` copy on any machine (the
/// library sizes its thread count from `available_parallelism`, which reads this mask).
fn at_most_two_cpus() {
    let mut mask = [0u64; 16];
    let size = std::mem::size_of_val(&mask);
    if unsafe { sched_getaffinity(0, size, mask.as_mut_ptr()) } != 0 {
        return;
    }
    let mut kept = 0;
    for word in mask.iter_mut() {
        for bit in 0..64 {
            if *word & (1 << bit) != 0 {
                if kept == 2 {
                    *word &= !(1 << bit);
                } else {
                    kept += 1;
                }
            }
        }
    }
    unsafe { sched_setaffinity(0, size, mask.as_ptr()) };
}

#[test]
fn working_memory_is_bounded_without_the_weight_size() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    at_most_two_cpus();
    let threads = std::thread::available_parallelism().map_or(1, |p| p.get());
    assert!(
        threads <= 2,
        "the CPU mask was not narrowed: {threads} threads"
    );
    let (n, h) = (64, 256);
    for dt in [Dt::F32, Dt::BF16] {
        for call in [
            Call::Forward,
            Call::BackwardAccumulate,
            Call::ForwardBackward,
        ] {
            for chunk in [16, 64] {
                for v in [4096, 16384] {
                    let peak = measure(call, (n, h, v), chunk, dt);
                    // d_hidden as f32 and as f64 for the write (12·N·H), per-row vectors (≤ 256 B
                    // a token), the hidden chunk as f32, and per thread a row of V float32, a
                    // converted weight block (256 rows) and the GEMM's buffers. A float64 copy
                    // of d_weight (8·V·H = 32 MiB at V = 16384) would not fit.
                    let bound = 12 * n * h
                        + 256 * n
                        + chunk * h * 4
                        + threads * (v * 4 + 256 * h * 4 + GEMM_PER_THREAD);
                    println!(
                        "{call:?} {dt:?} V = {v} chunk {chunk}: library heap peak {:.2} MiB \
                         (bound {:.2} MiB; V·H·4 = {:.2} MiB)",
                        peak as f64 / 1048576.0,
                        bound as f64 / 1048576.0,
                        (v * h * 4) as f64 / 1048576.0
                    );
                    assert!(
                        peak <= bound,
                        "{call:?} {dt:?} V = {v} chunk {chunk}: {peak} B > {bound} B"
                    );
                }
            }
        }
    }
}
