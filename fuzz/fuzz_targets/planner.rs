//! The scheduler: calibrl_scheduler_config_default, calibrl_plan_new, every query of a plan
//! (summary, mini-batches, normalisers, micro-batches, gather map, expert prompts / offsets,
//! oversize lists, dropped prompts, sequences), calibrl_plan_collect_experts and
//! calibrl_plan_free; with and without dynamic sampling (rewards mostly 0 / 1, so that whole
//! groups are often all equal).
#![no_main]

use calibrl::desc::metrics::CalibrlNormalizers;
use calibrl::ffi::scheduler::*;
use calibrl_fuzz::*;
use libfuzzer_sys::fuzz_target;

const TOO_SMALL: i32 = 11;

fn status_ok(what: &str, st: i32) {
    assert!(
        (OK..=LAST_STATUS).contains(&st) && st != PANIC,
        "{what}: {st} {}",
        last_error()
    );
    assert_eq!(
        st == OK,
        last_error().is_empty(),
        "{what}: status {st} vs message"
    );
}

fn small_or(b: &mut Bytes, small: u64, edge: u64) -> u64 {
    if b.rare(10) {
        [0, 1, edge, edge - 1, b.u64() % (edge.max(1))][b.below(5)]
    } else {
        1 + b.below(small as usize) as u64
    }
}

/// An array query (`f(ptr, cap, len)`) into an exact-size array of a fuzzed capacity.
fn array<T: Copy + Default + PartialEq + std::fmt::Debug>(
    b: &mut Bytes,
    what: &str,
    f: impl Fn(*mut T, usize, *mut usize) -> i32,
) -> Option<Vec<T>> {
    let mut len = usize::MAX;
    let st = f(std::ptr::null_mut(), 0, &mut len);
    status_ok(what, st);
    if st != OK {
        return None;
    }
    assert!(len < 1 << 24, "{what}: len {len}");
    let cap = if b.rare(4) { b.below(len + 2) } else { len };
    let mut buf = vec![T::default(); cap];
    let mut len2 = usize::MAX;
    let st = f(buf.as_mut_ptr(), cap, &mut len2);
    status_ok(what, st);
    assert_eq!(len2, len, "{what}: len");
    if cap < len {
        assert_eq!(st, TOO_SMALL, "{what}: cap {cap} < {len}");
        assert!(
            buf.iter().all(|x| *x == T::default()),
            "{what}: written when too small"
        );
        return None;
    }
    assert_eq!(st, OK);
    assert!(
        buf[len..].iter().all(|x| *x == T::default()),
        "{what}: written past len"
    );
    assert_ne!(
        f(buf.as_mut_ptr(), cap, std::ptr::null_mut()),
        OK,
        "{what}: NULL len"
    );
    buf.truncate(len);
    Some(buf)
}

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes::new(data);
    let mut cfg: CalibrlSchedulerConfig = unsafe { std::mem::zeroed() };
    assert_eq!(
        unsafe { calibrl_scheduler_config_default(&mut cfg) } as i32,
        OK
    );
    cfg.dp_ranks = small_or(&mut b, 6, u32::MAX as u64) as u32;
    cfg.minibatch_prompts = small_or(&mut b, 4, u32::MAX as u64) as u32;
    cfg.nograd_token_budget = small_or(&mut b, 300, u64::MAX);
    cfg.train_token_budget = small_or(&mut b, 300, u64::MAX);
    cfg.loss_kind = if b.rare(16) {
        b.u32()
    } else {
        b.below(4) as u32
    };
    cfg.expert_selection = if b.rare(16) {
        b.u32()
    } else {
        b.below(3) as u32
    };
    cfg.seed = b.u64();
    cfg.fraction = if b.rare(4) {
        b.float()
    } else {
        b.below(5) as f64 / 4.0
    };
    cfg.pass_rate_low = if b.rare(4) { b.float() } else { 0.0 };
    cfg.pass_rate_high = if b.rare(4) {
        b.float()
    } else {
        b.below(5) as f64 / 4.0
    };
    cfg.reward_threshold = if b.rare(4) { b.float() } else { 0.5 };
    cfg.quadratic_coef = if b.rare(6) { b.float() } else { 1.0 / 24576.0 };
    cfg.dynamic_sampling = if b.rare(16) {
        b.u32()
    } else {
        b.rare(2) as u32
    };

    let n_prompts = b.below(9);
    let prompts: Vec<CalibrlPromptDesc> = (0..n_prompts)
        .map(|_| CalibrlPromptDesc {
            prompt_len: small_or(&mut b, 60, u32::MAX as u64) as u32,
            num_rollouts: if b.rare(16) {
                b.u32() % 5
            } else {
                1 + b.below(4) as u32
            },
            expert_len: match b.u8() % 4 {
                0 => -1,
                1 if b.rare(4) => b.count(4),
                _ => 1 + b.below(80) as i64,
            },
        })
        .collect();
    let mut n_rollouts: usize = prompts.iter().map(|p| p.num_rollouts as usize).sum();
    if b.rare(16) {
        n_rollouts = b.below(n_rollouts + 3);
    }
    let lens: Vec<u32> = (0..n_rollouts)
        .map(|_| small_or(&mut b, 120, u32::MAX as u64) as u32)
        .collect();
    let rewards: Option<Vec<f64>> = (cfg.dynamic_sampling != 0 || b.rare(2)).then(|| {
        (0..n_rollouts)
            .map(|_| {
                if b.rare(4) {
                    b.float()
                } else {
                    b.below(2) as f64
                }
            })
            .collect()
    });
    let mut plan = std::ptr::null_mut();
    let st = unsafe {
        calibrl_plan_new(
            &cfg,
            if prompts.is_empty() && b.rare(2) {
                std::ptr::null()
            } else {
                prompts.as_ptr()
            },
            prompts.len(),
            lens.as_ptr(),
            lens.len(),
            rewards.as_ref().map_or(std::ptr::null(), |r| r.as_ptr()),
            &mut plan,
        )
    } as i32;
    status_ok("plan_new", st);
    if st != OK {
        assert!(plan.is_null(), "plan written on error");
        return;
    }
    assert!(!plan.is_null());

    let mut info = CalibrlPlanInfo::default();
    assert_eq!(unsafe { calibrl_plan_summary(plan, &mut info) } as i32, OK);
    assert_eq!(info.num_prompts as usize, n_prompts);
    assert_eq!(info.num_rollouts as usize, n_rollouts);
    assert_eq!(info.dp_ranks, cfg.dp_ranks as u64);
    let ranks = info.dp_ranks as usize;
    let seqs = (info.num_rollouts + info.num_expert_slots) as usize;

    // The no-grad pass holds every sequence exactly once.
    let mut seen = vec![0u32; seqs];
    for rank in 0..ranks.min(64) {
        for mb in 0..info.nograd_microbatches as usize {
            let ids = array::<i64>(&mut b, "nograd_microbatch", |p, cap, len| unsafe {
                calibrl_plan_nograd_microbatch(plan, rank, mb, p, std::ptr::null_mut(), cap, len)
                    as i32
            });
            for id in ids.unwrap_or_default() {
                assert!((0..seqs as i64).contains(&id), "seq id {id}");
                seen[id as usize] += 1;
            }
        }
    }
    if ranks <= 64 {
        assert!(
            seen.iter().all(|&c| c <= 1),
            "a sequence planned twice: {seen:?} {info:?} {cfg:?} {prompts:?} {lens:?}"
        );
    }
    // Out-of-range indices are errors, never crashes.
    let (r, m) = (b.count(ranks + 1) as usize, b.count(4) as usize);
    let mut len = 0usize;
    let mut kinds = vec![0u8; 4];
    let st = unsafe {
        calibrl_plan_nograd_microbatch(
            plan,
            r,
            m,
            std::ptr::null_mut(),
            kinds.as_mut_ptr(),
            4,
            &mut len,
        )
    } as i32;
    status_ok("nograd_microbatch (fuzzed index)", st);

    for mbi in 0..(info.num_minibatches as usize + 1).min(16) {
        let mut mi = CalibrlMinibatchInfo::default();
        let st = unsafe { calibrl_plan_minibatch(plan, mbi, &mut mi) } as i32;
        status_ok("plan_minibatch", st);
        let mut norm = CalibrlNormalizers::default();
        let st2 = unsafe { calibrl_plan_normalizers(plan, mbi, &mut norm) } as i32;
        assert_eq!(st, st2);
        if st != OK {
            assert!(mbi >= info.num_minibatches as usize);
            continue;
        }
        assert!(norm.token_count.is_finite() && norm.seq_count.is_finite());
        let rank = b.below(ranks.min(64));
        for mb in 0..(mi.microbatches as usize).min(8) {
            let _ = array::<u8>(&mut b, "train_microbatch", |p, cap, len| unsafe {
                calibrl_plan_train_microbatch(
                    plan,
                    mbi,
                    rank,
                    mb,
                    std::ptr::null_mut(),
                    p,
                    cap,
                    len,
                ) as i32
            });
        }
    }
    let gather = array::<i64>(&mut b, "gather_map", |p, cap, len| unsafe {
        calibrl_plan_gather_map(plan, p, cap, len) as i32
    });
    if let Some(g) = gather {
        assert_eq!(g.len(), n_rollouts);
    }
    let _ = array::<i64>(&mut b, "expert_prompts", |p, cap, len| unsafe {
        calibrl_plan_expert_prompts(plan, p, cap, len) as i32
    });
    let offsets = array::<i64>(&mut b, "expert_offsets", |p, cap, len| unsafe {
        calibrl_plan_expert_offsets(plan, p, cap, len) as i32
    });
    let dropped = array::<i64>(&mut b, "dropped_prompts", |p, cap, len| unsafe {
        calibrl_plan_dropped_prompts(plan, p, cap, len) as i32
    });
    if let Some(d) = dropped {
        assert_eq!(
            d.len() as u64,
            info.dropped_prompts,
            "dropped_prompts length"
        );
        assert!(
            d.windows(2).all(|w| w[0] < w[1])
                && d.iter().all(|&g| (0..n_prompts as i64).contains(&g)),
            "dropped prompts {d:?} not increasing within 0..{n_prompts}"
        );
        if cfg.dynamic_sampling == 0 {
            assert!(
                d.is_empty(),
                "prompts dropped without dynamic sampling: {d:?}"
            );
        }
        // A dropped group's rewards are all equal.
        let r = rewards.as_deref().unwrap_or_default();
        assert!(
            d.is_empty() || !r.is_empty(),
            "prompts dropped without rewards"
        );
        let mut first = vec![0usize; n_prompts + 1];
        for (g, p) in prompts.iter().enumerate() {
            first[g + 1] = first[g] + p.num_rollouts as usize;
        }
        for &g in &d {
            let group = &r[first[g as usize]..first[g as usize + 1]];
            assert!(
                group.iter().all(|&x| x == group[0]),
                "prompt {g} dropped with rewards {group:?}"
            );
        }
    }
    let pass = if b.rare(8) {
        b.u32()
    } else {
        b.below(2) as u32
    };
    let mut len = 0usize;
    let st = unsafe { calibrl_plan_oversize(plan, pass, std::ptr::null_mut(), 0, &mut len) } as i32;
    status_ok("oversize", st);
    if st == OK {
        let _ = array::<i64>(&mut b, "oversize", |p, cap, len| unsafe {
            calibrl_plan_oversize(plan, pass, p, cap, len) as i32
        });
    }
    for _ in 0..4 {
        let id = if b.rare(3) {
            b.count(seqs + 2)
        } else {
            b.below(seqs + 1) as i64
        };
        let mut s = CalibrlSeqInfo::default();
        let st = unsafe { calibrl_plan_seq(plan, id, &mut s) } as i32;
        status_ok("plan_seq", st);
        assert_eq!(st == OK, (0..seqs as i64).contains(&id), "seq {id}");
        if st != OK {
            assert_eq!(s, CalibrlSeqInfo::default(), "written on error");
        }
    }

    // collect_experts on the packed no-grad output of one rank or all.
    let rank = if b.rare(3) {
        -1
    } else if b.rare(8) {
        b.count(ranks)
    } else {
        b.below(ranks) as i64
    };
    let mut total_len = 0usize;
    if rank == -1 || (0..ranks.min(64) as i64).contains(&rank) {
        let rs = if rank == -1 {
            0..ranks.min(64)
        } else {
            rank as usize..rank as usize + 1
        };
        for r in rs {
            for mb in 0..info.nograd_microbatches as usize {
                let ids = array::<i64>(
                    &mut Bytes::new(&[]),
                    "nograd_microbatch",
                    |p, cap, len| unsafe {
                        calibrl_plan_nograd_microbatch(
                            plan,
                            r,
                            mb,
                            p,
                            std::ptr::null_mut(),
                            cap,
                            len,
                        ) as i32
                    },
                );
                for id in ids.unwrap_or_default() {
                    let mut s = CalibrlSeqInfo::default();
                    assert_eq!(unsafe { calibrl_plan_seq(plan, id, &mut s) } as i32, OK);
                    total_len += s.response_len as usize;
                }
            }
        }
    }
    let t_star = offsets
        .as_ref()
        .and_then(|o| o.last().copied())
        .unwrap_or(0)
        .max(0) as usize;
    if total_len <= 1 << 16 && t_star <= 1 << 16 {
        let Some(src) = FTensor::build(&mut b, &Want::input(&FLOATS, &[total_len]), true) else {
            unsafe { calibrl_plan_free(plan) };
            return;
        };
        let want_e = Want::output(&FLOATS, &[t_star]);
        let want_s = Want::output(&FLOATS, &[info.num_expert_slots as usize]);
        let (Some(mut packed), Some(mut sums)) = (
            optional(&mut b, &want_e, true),
            optional(&mut b, &want_s, true),
        ) else {
            unsafe { calibrl_plan_free(plan) };
            return;
        };
        let tensors = [Some(&src), packed.as_ref(), sums.as_ref()];
        let before = snapshot(&tensors);
        let st = unsafe {
            calibrl_plan_collect_experts(
                plan,
                rank,
                src.ptr(),
                mptr_of(&mut packed),
                mptr_of(&mut sums),
                b.rare(2),
                std::ptr::null_mut(),
            )
        } as i32;
        let tensors = [Some(&src), packed.as_ref(), sums.as_ref()];
        check("collect_experts", st, &tensors, &before, None);
    }
    unsafe { calibrl_plan_free(plan) };
    unsafe { calibrl_plan_free(std::ptr::null_mut()) };
});
