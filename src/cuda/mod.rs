//! CUDA backend (placeholder until the CUDA backend lands): every entry point reports that the
//! backend is unavailable.

pub mod logits {
    use crate::error::{Error, Result};
    use crate::ops::logits::{Backward, Forward, ShardFinish, ShardStats};
    use crate::ops::Stream;

    fn unavailable<T>() -> Result<T> {
        Err(Error::cuda_unavailable(
            "CUDA tensors were passed but this build has no CUDA backend yet",
        ))
    }
    pub fn forward(_: &Forward, _: i32, _: Stream) -> Result<()> {
        unavailable()
    }
    pub fn backward(_: &Backward, _: i32, _: Stream) -> Result<()> {
        unavailable()
    }
    pub fn shard_stats(_: &ShardStats, _: i32, _: Stream) -> Result<()> {
        unavailable()
    }
    pub fn shard_finish(_: &ShardFinish, _: i32, _: Stream) -> Result<()> {
        unavailable()
    }
}

pub mod loss {
    use crate::config::Config;
    use crate::cpu::loss::CalibrlMetrics;
    use crate::error::{Error, Result};
    use crate::ops::loss::{Advantages, Loss};
    use crate::ops::Stream;

    fn unavailable<T>() -> Result<T> {
        Err(Error::cuda_unavailable(
            "CUDA tensors were passed but this build has no CUDA backend yet",
        ))
    }
    pub fn group_advantages(_: &Config, _: &Advantages, _: i32, _: Stream) -> Result<()> {
        unavailable()
    }
    pub fn loss(
        _: &Config,
        _: &Loss,
        _: Option<&mut CalibrlMetrics>,
        _: i32,
        _: Stream,
    ) -> Result<()> {
        unavailable()
    }
}
