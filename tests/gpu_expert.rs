//! GPU test of the scheduler's expert helper: `collect_experts` on CUDA tensors against the CPU
//! backend, for all ranks at once and rank by rank, f32 and bf16, with and without length
//! normalisation. Outputs are poisoned with NaN first, so agreement proves every element was
//! written. Ignored by a plain `cargo test` (it needs a device); run it with
//! `-- --include-ignored` on a GPU machine (scripts/gpu-check.sh does). Without a CUDA driver or
//! device it then prints "skipped: no CUDA device" and returns.

use calibrl::ops::expert::collect_experts;
use calibrl::scheduler::{plan, ExpertSelection, PromptInput, SchedulerConfig, StepInput};
use calibrl::tensor::{DLDataType, DLDevice, DLTensor, Tensor, DL_CPU, DL_CUDA};
use cudarc::driver::DevicePtr;
use half::bf16;
use std::ffi::c_void;

#[macro_use]
mod gpu_common;
use gpu_common::Rng;

fn desc(data: *mut c_void, device_type: i32, bf: bool, shape: &mut [i64]) -> DLTensor {
    DLTensor {
        data,
        device: DLDevice {
            device_type,
            device_id: 0,
        },
        ndim: 1,
        dtype: if bf {
            DLDataType {
                code: 4,
                bits: 16,
                lanes: 1,
            }
        } else {
            DLDataType {
                code: 2,
                bits: 32,
                lanes: 1,
            }
        },
        shape: shape.as_mut_ptr(),
        strides: std::ptr::null_mut(),
        byte_offset: 0,
    }
}

fn encode(v: &[f32], bf: bool) -> Vec<u8> {
    v.iter()
        .flat_map(|&x| {
            if bf {
                bf16::from_f32(x).to_le_bytes().to_vec()
            } else {
                x.to_le_bytes().to_vec()
            }
        })
        .collect()
}

fn decode(b: &[u8], bf: bool) -> Vec<f32> {
    if bf {
        b.chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect()
    } else {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a GPU machine (scripts/gpu-check.sh does)"]
fn collect_experts_matches_cpu() {
    let (g, _guard) = require_gpu!();
    let stream = g.stream.clone();
    let mut rng = Rng(42);
    let prompts = (0..37)
        .map(|i| PromptInput {
            prompt_len: 10 + (rng.next() % 50) as u32,
            rollout_lens: (0..4).map(|_| 1 + (rng.next() % 300) as u32).collect(),
            expert_len: (i % 5 != 0).then(|| 1 + (rng.next() % 400) as u32),
            rewards: None,
        })
        .collect();
    let mut cfg = SchedulerConfig::new(3, 2048, 1024, 16);
    cfg.expert_selection = ExpertSelection::All;
    let p = plan(&StepInput { prompts }, &cfg).unwrap();
    let slots = p.num_expert_slots();
    let total = *p.expert_offsets.last().unwrap() as usize;
    assert!(slots > 10 && total > 0);
    for bf in [false, true] {
        for normalize in [false, true] {
            for rank in [None, Some(0), Some(2)] {
                let part: usize = p.nograd.ranks[match rank {
                    Some(r) => r..r + 1,
                    None => 0..3,
                }]
                .iter()
                .flatten()
                .flat_map(|mb| &mb.seqs)
                .map(|s| s.response_len as usize)
                .sum();
                let src: Vec<f32> = (0..part)
                    .map(|_| -((rng.next() % 10000) as f32) / 2000.0)
                    .collect();
                let src_bytes = encode(&src, bf);
                // CPU reference.
                let mut cpu_src = src_bytes.clone();
                let (mut cpu_lp, mut cpu_sums) = (
                    encode(&vec![f32::NAN; total], bf),
                    encode(&vec![f32::NAN; slots], bf),
                );
                let (mut s0, mut s1, mut s2) = ([part as i64], [total as i64], [slots as i64]);
                let t_src = desc(cpu_src.as_mut_ptr() as _, DL_CPU, bf, &mut s0);
                let t_lp = desc(cpu_lp.as_mut_ptr() as _, DL_CPU, bf, &mut s1);
                let t_sums = desc(cpu_sums.as_mut_ptr() as _, DL_CPU, bf, &mut s2);
                // SAFETY: the descriptors point at live host buffers of their shapes.
                unsafe {
                    let (a, b, c) = (
                        Tensor::from_raw(&t_src, "nograd_logprobs").unwrap(),
                        Tensor::from_raw(&t_lp, "expert_logprobs").unwrap(),
                        Tensor::from_raw(&t_sums, "expert_sums").unwrap(),
                    );
                    collect_experts(
                        &p,
                        rank,
                        &a,
                        Some(&b),
                        Some(&c),
                        normalize,
                        std::ptr::null_mut(),
                    )
                    .unwrap();
                }
                // GPU.
                let d_src = stream.memcpy_stod(&src_bytes).unwrap();
                let d_lp = stream
                    .memcpy_stod(&encode(&vec![f32::NAN; total], bf))
                    .unwrap();
                let d_sums = stream
                    .memcpy_stod(&encode(&vec![f32::NAN; slots], bf))
                    .unwrap();
                {
                    let (ps, _g1) = d_src.device_ptr(&stream);
                    let (pl, _g2) = d_lp.device_ptr(&stream);
                    let (pm, _g3) = d_sums.device_ptr(&stream);
                    let g_src = desc(ps as usize as _, DL_CUDA, bf, &mut s0);
                    let g_lp = desc(pl as usize as _, DL_CUDA, bf, &mut s1);
                    let g_sums = desc(pm as usize as _, DL_CUDA, bf, &mut s2);
                    // SAFETY: the descriptors point at live device buffers of their shapes.
                    unsafe {
                        let (a, b, c) = (
                            Tensor::from_raw(&g_src, "nograd_logprobs").unwrap(),
                            Tensor::from_raw(&g_lp, "expert_logprobs").unwrap(),
                            Tensor::from_raw(&g_sums, "expert_sums").unwrap(),
                        );
                        collect_experts(
                            &p,
                            rank,
                            &a,
                            Some(&b),
                            Some(&c),
                            normalize,
                            stream.cu_stream() as *mut c_void,
                        )
                        .unwrap();
                    }
                }
                stream.synchronize().unwrap();
                let gpu_lp = decode(&stream.memcpy_dtov(&d_lp).unwrap(), bf);
                let gpu_sums = decode(&stream.memcpy_dtov(&d_sums).unwrap(), bf);
                let cpu_lp = decode(&cpu_lp, bf);
                let cpu_sums = decode(&cpu_sums, bf);
                assert_eq!(
                    gpu_lp, cpu_lp,
                    "packed expert tensor (bf16 {bf}, rank {rank:?})"
                );
                let tol = if bf { 1e-2 } else { 1e-5 };
                for (s, (g, c)) in gpu_sums.iter().zip(&cpu_sums).enumerate() {
                    assert!((g - c).abs() <= tol * c.abs().max(1.0), "slot {s}: gpu {g} cpu {c} (bf16 {bf}, normalise {normalize}, rank {rank:?})");
                }
            }
        }
    }
}
