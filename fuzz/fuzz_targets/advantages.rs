//! calibrl_group_advantages.
#![no_main]

use calibrl::ffi::loss::{calibrl_group_advantages, CalibrlAdvantageArgs};
use calibrl_fuzz::*;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes::new(data);
    let json = config_json(&mut b);
    let (_, Some(cfg)) = Config::new(&json) else {
        return;
    };
    let rows = b.below(40);
    let groups = 1 + b.below(6);
    let num_groups = if b.rare(8) { b.count(8) } else { groups as i64 };
    let ids: Vec<f64> = (0..rows)
        .map(|_| {
            if b.rare(20) {
                b.count(8) as f64
            } else {
                b.below(groups) as f64
            }
        })
        .collect();
    let flags: Vec<f64> = (0..rows).map(|_| (b.u8() % 2) as f64).collect();
    let Some(rewards) = FTensor::build(&mut b, &Want::input(&FLOATS, &[rows]), false) else {
        return;
    };
    let Some(group_ids) =
        FTensor::build(&mut b, &Want::input(&[I64, I32], &[rows]).with(&ids), true)
    else {
        return;
    };
    let Some(correct) = optional(
        &mut b,
        &Want::input(&[U8, BOOL, I32], &[rows]).with(&flags),
        true,
    ) else {
        return;
    };
    let Some(is_expert) = optional(
        &mut b,
        &Want::input(&[U8, BOOL, I64], &[rows]).with(&flags),
        true,
    ) else {
        return;
    };
    let mut outs = Vec::new();
    for _ in 0..3 {
        let Some(t) = FTensor::build(&mut b, &Want::output(&FLOATS, &[rows]), true) else {
            return;
        };
        outs.push(t);
    }
    let [mut adv, mut w, mut c]: [FTensor; 3] = outs.try_into().ok().unwrap();
    let args = CalibrlAdvantageArgs {
        rewards: rewards.ptr(),
        group_ids: group_ids.ptr(),
        num_groups,
        correct: ptr_of(&correct),
        is_expert: ptr_of(&is_expert),
        advantages: adv.mptr(),
        weights: w.mptr(),
        signs: c.mptr(),
    };
    let tensors = [
        Some(&rewards),
        Some(&group_ids),
        correct.as_ref(),
        is_expert.as_ref(),
        Some(&adv),
        Some(&w),
        Some(&c),
    ];
    let before = snapshot(&tensors);
    let st = unsafe { calibrl_group_advantages(cfg.0, &args, std::ptr::null_mut()) } as i32;
    check("group_advantages", st, &tensors, &before, None);
    if st == OK {
        // Signs are ±1 and weights are >= 0.
        assert!(c.values().iter().all(|&s| s == 1.0 || s == -1.0));
        assert!(w.values().iter().all(|&x| x >= 0.0));
    }
    let st = unsafe { calibrl_group_advantages(std::ptr::null(), &args, std::ptr::null_mut()) };
    assert_eq!(st as i32, 1);
});
