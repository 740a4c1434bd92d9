//! The logits family's kernel source (`cuda/logits.cu`).

use crate::cuda::compile::KernelSource;

/// The fused logits path (SPEC §6).
pub const LOGITS: KernelSource = KernelSource {
    name: "logits",
    source: include_str!("../../../cuda/logits.cu"),
    kernels: &[
        "calibrl_logits_forward_bf16",
        "calibrl_logits_forward_f16",
        "calibrl_logits_forward_f32",
        "calibrl_logits_backward_bf16",
        "calibrl_logits_backward_f16",
        "calibrl_logits_backward_f32",
        "calibrl_logits_shard_stats_bf16",
        "calibrl_logits_shard_stats_f16",
        "calibrl_logits_shard_stats_f32",
        "calibrl_logits_shard_finish",
        "calibrl_logits_single_pass_bf16",
        "calibrl_logits_single_pass_f16",
        "calibrl_logits_single_pass_f32",
    ],
};
