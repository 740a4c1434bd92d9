//! Launch geometry: the blocks of the row kernels, and the choice between the single-pass
//! kernel (its cluster, chunk and shared memory) and the three-pass path.

use crate::cuda::device::device;
use crate::cuda::launch::Geometry;
use crate::error::Result;
use crate::tensor::DType;

/// One block per row (grid-strided past 2^31 − 1 rows); the block is just large enough to give
/// every thread four 16-byte vectors of the row, between one warp and 256 threads. Depends only
/// on (N, V, dtype), which keeps the results deterministic. At most 256 threads: the kernels'
/// `__launch_bounds__(256, 4)`.
pub(super) fn row_geometry(n: usize, v: usize, dtype: DType) -> Geometry {
    let per_vector = 16 / dtype.size();
    let wanted = v.div_ceil(per_vector * 4).next_power_of_two();
    Geometry {
        blocks: n.min(i32::MAX as usize) as u32,
        threads: wanted.clamp(32, 256) as u32,
    }
}

/// Bytes of the single-pass kernel's shared memory before the row chunk (`CALIBRL_SP_HEADER` in
/// `cuda/logits.cu`: the partials and the CTA reduction's scratch).
const SINGLE_PASS_HEADER: usize = 416;
/// The largest portable thread-block cluster.
const MAX_CLUSTER: usize = 8;

/// How `forward_backward` runs on a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsPath {
    /// One kernel: each row read once into the shared memory of a cluster of `cluster` CTAs,
    /// each holding `chunk` elements in `smem_bytes` of dynamic shared memory.
    SinglePass {
        cluster: usize,
        chunk: usize,
        smem_bytes: usize,
    },
    /// `forward` then `backward`.
    ThreePass,
}

/// The path for rows of `v` elements of `dtype` on a device compiled for `arch` (e.g. 90) that
/// lets a block opt into `smem_optin` bytes of dynamic shared memory: the single pass with the
/// smallest cluster (1, 2, 4 or 8 CTAs) whose chunk fits, on sm_90+; else three passes.
pub fn plan(arch: i32, smem_optin: usize, v: usize, dtype: DType) -> LogitsPath {
    if arch < 90 {
        return LogitsPath::ThreePass;
    }
    let (size, per_vector) = (dtype.size(), 16 / dtype.size());
    let mut cluster = 1;
    while cluster <= MAX_CLUSTER {
        let chunk = v.div_ceil(cluster).next_multiple_of(per_vector);
        // + one vector: the chunk sits at its row address mod 16 in shared memory.
        let smem_bytes = SINGLE_PASS_HEADER + (chunk + per_vector) * size;
        if smem_bytes <= smem_optin {
            return LogitsPath::SinglePass {
                cluster,
                chunk,
                smem_bytes,
            };
        }
        cluster *= 2;
    }
    LogitsPath::ThreePass
}

/// The path `forward_backward` takes for `[_, v]` logits of `dtype` on device `ordinal`.
pub fn forward_backward_path(ordinal: i32, v: usize, dtype: DType) -> Result<LogitsPath> {
    let dev = device(ordinal)?;
    Ok(plan(dev.arch, dev.smem_optin, v, dtype))
}

/// Threads per CTA of the single pass: four 16-byte vectors of the chunk per thread, 32 … 1024
/// (the kernel's `__launch_bounds__(1024, 1)`).
pub(super) fn single_pass_threads(chunk: usize, dtype: DType) -> u32 {
    let per_vector = 16 / dtype.size();
    chunk
        .div_ceil(per_vector * 4)
        .next_power_of_two()
        .clamp(32, 1024) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_pass_only_on_sm90_with_the_smallest_cluster_that_fits() {
        const H100: usize = 227 << 10;
        assert_eq!(plan(80, H100, 1000, DType::BF16), LogitsPath::ThreePass);
        // bf16, 152064: 2 CTAs of 76032 elements (≈ 149 KB each).
        assert_eq!(
            plan(90, H100, 152_064, DType::BF16),
            LogitsPath::SinglePass {
                cluster: 2,
                chunk: 76_032,
                smem_bytes: 416 + (76_032 + 8) * 2
            }
        );
        assert!(matches!(
            plan(90, H100, 262_144, DType::BF16),
            LogitsPath::SinglePass { cluster: 4, .. }
        ));
        assert!(matches!(
            plan(90, H100, 152_064, DType::F32),
            LogitsPath::SinglePass { cluster: 4, .. }
        ));
        assert!(matches!(
            plan(90, H100, 32_000, DType::F16),
            LogitsPath::SinglePass { cluster: 1, .. }
        ));
        // 8 CTAs hold at most 8 · 227 KB.
        assert_eq!(plan(90, H100, 1 << 20, DType::BF16), LogitsPath::ThreePass);
        // Every chunk is a whole number of vectors and the chunks cover the row.
        for v in [1usize, 7, 4099, 100_003] {
            if let LogitsPath::SinglePass { cluster, chunk, .. } = plan(90, 40_000, v, DType::F32) {
                assert_eq!(chunk % 4, 0);
                assert!(cluster * chunk >= v);
                // The next smaller cluster would not fit.
                let half = (cluster / 2).max(1);
                let bigger = v.div_ceil(half).next_multiple_of(4);
                assert!(cluster == 1 || 416 + (bigger + 4) * 4 > 40_000);
            }
        }
    }

    #[test]
    fn geometry_gives_each_thread_up_to_four_vectors() {
        let g = row_geometry(1000, 152_064, DType::BF16);
        assert_eq!((g.blocks, g.threads), (1000, 256));
        assert_eq!(row_geometry(7, 5, DType::F32).threads, 32);
        assert_eq!(row_geometry(7, 1, DType::BF16).threads, 32);
        assert_eq!(row_geometry(3, 2048, DType::F32).threads, 128);
        assert_eq!(
            row_geometry(usize::MAX / 2, 8, DType::F32).blocks,
            i32::MAX as u32
        );
    }
}
