//! The loss family's kernel source (`cuda/loss.cu`).

use crate::cuda::compile::KernelSource;

/// The loss family (SPEC §3–§4, and the expert baseline of §7).
pub const LOSS: KernelSource = KernelSource {
    name: "loss",
    source: include_str!("../../../cuda/loss.cu"),
    kernels: &[
        "calibrl_group_stats",
        "calibrl_group_advantages",
        "calibrl_loss_counts",
        "calibrl_loss_rows",
        "calibrl_loss_f32",
        "calibrl_loss_f64",
        "calibrl_loss_bf16",
        "calibrl_loss_f16",
        "calibrl_loss_any",
        "calibrl_collect_experts",
        "calibrl_cov_prepare",
        "calibrl_cov_histogram",
    ],
};
