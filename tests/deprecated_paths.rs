//! The paths that moved in the layering change (issue 14) still resolve, as deprecated
//! aliases, to the same items: a caller's old `use` keeps compiling (with a warning).
#![allow(deprecated)]

use calibrl::desc::metrics;

#[test]
fn moved_items_keep_their_old_paths() {
    let m: calibrl::cpu::loss::CalibrlMetrics = metrics::CalibrlMetrics::default();
    let n: calibrl::cpu::loss::CalibrlNormalizers = metrics::CalibrlNormalizers::default();
    assert_eq!(m.to_array().len(), calibrl::cpu::loss::METRICS_LEN);
    assert_eq!(calibrl::cpu::loss::METRICS_LEN, metrics::METRICS_LEN);
    assert_eq!(n, metrics::CalibrlNormalizers::default());
    // The descriptors are also reachable where the operations are.
    let _: Option<calibrl::ops::loss::Layout> = None::<calibrl::desc::loss::Layout>;
    let _: calibrl::ops::Stream = std::ptr::null_mut::<std::ffi::c_void>() as calibrl::desc::Stream;
    assert_eq!(
        calibrl::cuda::compile::LOGITS.name,
        calibrl::cuda::logits::LOGITS.name
    );
    let old: Vec<&str> = calibrl::cuda::compile::SOURCES
        .iter()
        .map(|s| s.name)
        .collect();
    let new: Vec<&str> = calibrl::cuda::SOURCES.iter().map(|s| s.name).collect();
    assert_eq!(old, new);
    // Functions: the old and the new path are the same signature.
    let _old: fn(i32) -> calibrl::Result<calibrl::cuda::Compiled> =
        calibrl::cuda::compile::compile_all;
    let _new: fn(i32) -> calibrl::Result<calibrl::cuda::Compiled> = calibrl::cuda::compile_all;
    let _ = calibrl::scheduler::collect_experts;
    let _ = calibrl::ops::expert::collect_experts;
}
