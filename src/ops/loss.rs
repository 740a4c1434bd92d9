//! Dispatch of the group advantages (SPEC §3) and the loss on log-prob inputs (SPEC §4):
//! validates the descriptor, then runs the CPU or CUDA backend on the tensors' device. The
//! descriptors are in [`crate::desc::loss`].

use super::on_device;
use crate::config::Config;
use crate::desc::loss::{Advantages, Loss};
use crate::desc::metrics::CalibrlMetrics;
use crate::desc::Stream;
use crate::error::Result;
use crate::tensor::Device;

/// Writes each row's advantage, rarity weight and sign (SPEC §3).
pub fn group_advantages(cfg: &Config, args: &Advantages, stream: Stream) -> Result<()> {
    let device = args.validate()?;
    on_device(
        device,
        || crate::cpu::advantages::group_advantages(cfg, args),
        |d| crate::cuda::loss::group_advantages(cfg, args, d, stream),
    )
}

/// Runs the loss; `host_metrics` (optional) receives the metrics on the host.
pub fn loss(
    cfg: &Config,
    args: &Loss,
    host_metrics: Option<&mut CalibrlMetrics>,
    stream: Stream,
) -> Result<()> {
    // A `match` rather than `on_device`: both arms take `host_metrics`.
    match args.validate(cfg)? {
        Device::Cpu => crate::cpu::loss::run(cfg, args, host_metrics),
        Device::Cuda(d) => crate::cuda::loss::loss(cfg, args, host_metrics, d, stream),
    }
}
