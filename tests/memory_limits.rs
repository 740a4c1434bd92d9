//! Calls under an address-space limit (issue 30): a valid call that cannot get its working
//! memory returns an error status; it never aborts the host. Each test re-runs itself in a
//! child process (this test binary, filtered to the one test) that lowers its own
//! `RLIMIT_AS` to what it uses now plus a headroom, so an abort kills only the child and the
//! parent reports how it died. Kept out of `tests/robustness.rs`, which valgrind runs.

mod common;

use calibrl::ffi::common::{calibrl_config_free, calibrl_config_new};
use calibrl::ffi::loss::{calibrl_loss, CalibrlLossArgs};
use calibrl::ffi::scheduler::{
    calibrl_plan_free, calibrl_plan_summary, calibrl_scheduler_config_default, CalibrlPlanInfo,
    CalibrlPromptDesc, CalibrlSchedulerConfig,
};
use calibrl::tensor::HostTensor;
use common::{last_error, plan_new};
use std::process::Command;

const CHILD_ENV: &str = "CALIBRL_MEMORY_LIMIT_CHILD";
const MIB: u64 = 1 << 20;

extern "C" {
    fn setrlimit(resource: i32, rlim: *const [u64; 2]) -> i32;
}
/// `RLIMIT_AS` on Linux (x86-64 and AArch64).
const RLIMIT_AS: i32 = 9;

/// This process's virtual size now (`/proc/self/statm`, in pages of 4 KiB).
fn virtual_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("Linux /proc");
    let pages: u64 = statm.split_whitespace().next().unwrap().parse().unwrap();
    pages * 4096
}

/// Limits this process's address space to its size now plus `headroom` bytes.
fn limit_address_space(headroom: u64) {
    let limit = virtual_bytes() + headroom;
    let rc = unsafe { setrlimit(RLIMIT_AS, &[limit, limit]) };
    assert_eq!(rc, 0, "setrlimit(RLIMIT_AS) failed");
}

/// In the parent: runs test `name` in a child process and asserts that it exited normally
/// (a failed assertion, an abort or a signal fails the parent too). In the child: runs `body`.
fn in_child(name: &str, body: impl FnOnce()) {
    if std::env::var(CHILD_ENV).as_deref() == Ok(name) {
        body();
        println!("child {name} finished");
        return;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, name)
        .output()
        .expect("spawn the test binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains(&format!("child {name} finished")),
        "child {name} ended with {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
}

/// A valid GRPO loss over `t` tokens in one packed row (f32 log-probs −0.5, A = 1), with a
/// gradient output; returns the status and message.
fn big_loss(t: usize, before_call: impl FnOnce()) -> (i32, String, bool) {
    let mut logp = vec![-0.5f32; t];
    let mut offsets = vec![0i64, t as i64];
    let (mut adv, mut w, mut c) = (vec![1.0f32], vec![1.0f32], vec![1.0f32]);
    let mut grad = vec![7.0f32; t];
    let lp = HostTensor::f32(&mut logp, &[t]);
    let off = HostTensor::i64(&mut offsets, &[2]);
    let a = HostTensor::f32(&mut adv, &[1]);
    let wt = HostTensor::f32(&mut w, &[1]);
    let s = HostTensor::f32(&mut c, &[1]);
    let mut g = HostTensor::f32(&mut grad, &[t]);
    let mut cfg = std::ptr::null_mut();
    let json = c"{\"preset\": \"grpo\"}";
    assert_eq!(
        unsafe { calibrl_config_new(json.as_ptr(), &mut cfg) } as i32,
        0
    );
    let null = std::ptr::null();
    let args = CalibrlLossArgs {
        logprobs: lp.as_ptr(),
        seq_offsets: off.as_ptr(),
        mask: null,
        old_logprobs: null,
        ref_logprobs: null,
        entropy: null,
        advantages: a.as_ptr(),
        weights: wt.as_ptr(),
        signs: s.as_ptr(),
        is_expert: null,
        expert_logprobs: null,
        expert_offsets: null,
        expert_mask: null,
        expert_index: null,
        normalizers: std::ptr::null(),
        grad_logprobs: g.as_mut_ptr(),
        grad_entropy: std::ptr::null_mut(),
        metrics: std::ptr::null_mut(),
        token_weights: null,
    };
    before_call();
    let st = unsafe { calibrl_loss(cfg, &args, std::ptr::null_mut(), std::ptr::null_mut()) };
    let msg = last_error();
    unsafe { calibrl_config_free(cfg) };
    drop(g);
    (st as i32, msg, grad.iter().all(|&x| x == 7.0))
}

// Issue 30, defect 2: a valid 5·10⁷-token loss under RLIMIT_AS died with SIGABRT ("memory
// allocation of 400000000 bytes failed"): the CPU loss allocated its gradients infallibly.
// With 1000 MiB of headroom the call reads its inputs as f64 (2 × 381 MiB, requested
// fallibly) and then cannot get the third 381 MiB array: an error status, outputs untouched.
#[test]
fn loss_under_an_address_space_limit_returns_an_error() {
    in_child("loss_under_an_address_space_limit_returns_an_error", || {
        let (st, msg, untouched) = big_loss(50_000_000, || limit_address_space(1000 * MIB));
        assert_eq!(st, 2, "status {st}: {msg}");
        assert!(msg.contains("out of memory"), "{msg}");
        assert!(untouched, "the gradient output was written on error");
    });
}

/// Plans `smalls` one-token-budget sequences next to `ranks − 1` oversize ones: balancing puts
/// every oversize sequence alone on a rank and all the small ones on the last rank, which then
/// needs `smalls` micro-batches — the count every rank runs.
fn lopsided_plan(ranks: u32, smalls: u32) -> (i32, String, CalibrlPlanInfo) {
    let mut cfg: CalibrlSchedulerConfig = unsafe { std::mem::zeroed() };
    unsafe { calibrl_scheduler_config_default(&mut cfg) };
    cfg.dp_ranks = ranks;
    cfg.nograd_token_budget = 100;
    cfg.train_token_budget = 100;
    cfg.quadratic_coef = 0.0;
    let bigs = ranks as usize - 1;
    cfg.minibatch_prompts = (bigs + 1) as u32;
    let mut descs: Vec<CalibrlPromptDesc> = (0..bigs)
        .map(|_| CalibrlPromptDesc {
            prompt_len: 0,
            num_rollouts: 1,
            expert_len: -1,
        })
        .collect();
    descs.push(CalibrlPromptDesc {
        prompt_len: 0,
        num_rollouts: smalls,
        expert_len: -1,
    });
    let mut lens = vec![100 * smalls; bigs];
    lens.extend(std::iter::repeat(100).take(smalls as usize));
    let (st, plan) = plan_new(&cfg, &descs, &lens);
    let msg = last_error();
    let mut info: CalibrlPlanInfo = unsafe { std::mem::zeroed() };
    if st == 0 {
        assert_eq!(unsafe { calibrl_plan_summary(plan, &mut info) } as i32, 0);
        unsafe { calibrl_plan_free(plan) };
    }
    (st, msg, info)
}

// Issue 30, defect 3: every rank was padded to the busiest rank's micro-batch count, so 2^20
// ranks (allowed) with one rank holding 400 small sequences needed ≈ 26 GB and aborted under
// a 4 GiB limit. Empty micro-batches are no longer stored: the plan fits in 3 GiB.
#[test]
fn plan_memory_follows_the_sequences_not_ranks_times_microbatches() {
    in_child(
        "plan_memory_follows_the_sequences_not_ranks_times_microbatches",
        || {
            limit_address_space(3 << 30);
            let (st, msg, info) = lopsided_plan(1 << 20, 400);
            assert_eq!(st, 0, "{msg}");
            assert_eq!(info.nograd_microbatches, 400);
            assert_eq!(info.nograd_oversize, (1 << 20) - 1);
        },
    );
}

// Issue 30, defect 4: an unknown 1 MiB key cost ~190 bytes and ~6 s per byte… per MiB of key
// (the did-you-mean edit distance), aborted under a 128 MiB limit, and the message echoed the
// whole key. Now: no edit distance for a key longer than any known key, and a short message.
#[test]
fn an_unknown_one_mebibyte_key_is_cheap_and_quoted_short() {
    in_child(
        "an_unknown_one_mebibyte_key_is_cheap_and_quoted_short",
        || {
            let key = "k".repeat(1 << 20);
            let json = std::ffi::CString::new(format!("{{\"{key}\": 1}}")).unwrap();
            limit_address_space(128 * MIB);
            let start = std::time::Instant::now();
            let mut cfg = std::ptr::null_mut();
            let st = unsafe { calibrl_config_new(json.as_ptr(), &mut cfg) } as i32;
            let elapsed = start.elapsed();
            let msg = last_error();
            assert_eq!(st, 7, "{msg}");
            assert!(cfg.is_null());
            assert!(
                msg.contains("unknown key") && msg.contains("1048576 bytes"),
                "{msg}"
            );
            assert!(msg.len() < 2048, "the message is {} bytes long", msg.len());
            assert!(elapsed.as_secs_f64() < 5.0, "took {elapsed:?}");
        },
    );
}

// Issue 30, defect 2 (planner): the planner's containers grow infallibly, so a valid input too
// large for the memory left aborted. Planning now reserves its estimated peak fallibly first:
// the same 2^20-rank plan with 600 MiB of headroom (it needs ≈ 0.8 GB) is an error.
#[test]
fn planning_without_the_memory_it_needs_returns_an_error() {
    in_child(
        "planning_without_the_memory_it_needs_returns_an_error",
        || {
            limit_address_space(600 * MIB);
            let (st, msg, _) = lopsided_plan(1 << 20, 400);
            assert_eq!(st, 2, "{msg}");
            assert!(
                msg.contains("out of memory") && msg.contains("`prompts`"),
                "{msg}"
            );
        },
    );
}

// Found by the fuzz campaign of issue 30 (planner target, run G): `calibrl_plan_collect_experts`
// asked for only the sums staged every expert token in a float64 buffer (8·T* bytes, 4 GiB
// there) although no tensor of the call holds T* values — the plan's input only declares the
// experts' lengths. Asking for the sums alone now needs no buffer of the expert tokens' size.
#[test]
fn collecting_only_the_expert_sums_needs_no_buffer_of_the_expert_tokens() {
    use calibrl::ffi::scheduler::{
        calibrl_plan_collect_experts, calibrl_plan_nograd_microbatch, calibrl_plan_seq,
        CalibrlSeqInfo,
    };
    in_child(
        "collecting_only_the_expert_sums_needs_no_buffer_of_the_expert_tokens",
        || {
            const BIG: i64 = 1 << 28; // 2 GiB of float64 staging before the fix
            let mut cfg: CalibrlSchedulerConfig = unsafe { std::mem::zeroed() };
            unsafe { calibrl_scheduler_config_default(&mut cfg) };
            cfg.dp_ranks = 2;
            cfg.nograd_token_budget = 100;
            cfg.train_token_budget = 100;
            cfg.minibatch_prompts = 2;
            let descs = [
                CalibrlPromptDesc {
                    prompt_len: 0,
                    num_rollouts: 1,
                    expert_len: BIG,
                },
                CalibrlPromptDesc {
                    prompt_len: 0,
                    num_rollouts: 1,
                    expert_len: 3,
                },
            ];
            let (st, plan) = plan_new(&cfg, &descs, &[10, 10]);
            assert_eq!(st, 0, "{}", last_error());
            let mut info: CalibrlPlanInfo = unsafe { std::mem::zeroed() };
            assert_eq!(unsafe { calibrl_plan_summary(plan, &mut info) } as i32, 0);
            assert_eq!(info.expert_tokens, BIG as u64 + 3);
            limit_address_space(256 * MIB);
            let mut collected = 0;
            for rank in 0..2usize {
                // This rank's no-grad response tokens, and whether it holds the big expert.
                let mut tokens = 0u64;
                let mut small_expert_here = false;
                for mb in 0..info.nograd_microbatches as usize {
                    let (mut ids, mut kinds, mut len) = ([0i64; 8], [0u8; 8], 0usize);
                    let st = unsafe {
                        calibrl_plan_nograd_microbatch(
                            plan,
                            rank,
                            mb,
                            ids.as_mut_ptr(),
                            kinds.as_mut_ptr(),
                            8,
                            &mut len,
                        )
                    };
                    assert_eq!(st as i32, 0, "{}", last_error());
                    for &id in &ids[..len] {
                        let mut s = CalibrlSeqInfo::default();
                        assert_eq!(unsafe { calibrl_plan_seq(plan, id, &mut s) } as i32, 0);
                        tokens += s.response_len as u64;
                        small_expert_here |= s.response_len == 3;
                    }
                }
                if tokens >= BIG as u64 {
                    continue; // the rank holding the big expert: its no-grad output is 1 GiB
                }
                let mut nograd = vec![0.5f32; tokens as usize];
                let mut sums = vec![-1.0f32; info.num_expert_slots as usize];
                let src = HostTensor::f32(&mut nograd, &[tokens as usize]);
                let mut out = HostTensor::f32(&mut sums, &[info.num_expert_slots as usize]);
                let st = unsafe {
                    calibrl_plan_collect_experts(
                        plan,
                        rank as i64,
                        src.as_ptr(),
                        std::ptr::null(),
                        out.as_mut_ptr(),
                        false,
                        std::ptr::null_mut(),
                    )
                };
                assert_eq!(st as i32, 0, "rank {rank}: {}", last_error());
                drop(out);
                // Slot 0 is the big expert (held by the other rank: 0 here); slot 1 the small one.
                let small = if small_expert_here { 1.5 } else { 0.0 };
                assert_eq!(sums, [0.0, small], "rank {rank}");
                collected += 1;
            }
            assert_eq!(collected, 1, "exactly one rank holds the big expert");
            unsafe { calibrl_plan_free(plan) };
        },
    );
}
