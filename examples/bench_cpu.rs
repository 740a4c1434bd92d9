//! CPU backend throughput next to a straightforward non-fused implementation (one pass per
//! term with materialised intermediates, the shape of PyTorch-eager trainer code), run in the
//! same process on the same inputs.
//!
//! cargo run --release --example bench_cpu [-- --quick]

use calibrl::cpu::loss::{compute, ExpertBaseline, LossBatch};
use calibrl::cpu::parallel::for_row_chunks;
use calibrl::ffi::logits::{calibrl_logits_backward, calibrl_logits_forward};
use calibrl::tensor::HostTensor;
use calibrl::Config;
use half::bf16;
use std::hint::black_box;
use std::ptr::{null, null_mut};
use std::time::Instant;

struct Rng(u64);
impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Median wall time of `reps` runs (after one warm-up), in seconds.
fn median_time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    t[reps / 2]
}

fn loss_batch(tokens: usize, seq_len: usize, group: usize) -> LossBatch {
    let mut rng = Rng(1);
    let b = tokens / seq_len;
    let prompts = b / group;
    let rows = (0..b).map(|i| i * seq_len..(i + 1) * seq_len).collect();
    let logprobs: Vec<f64> = (0..tokens).map(|_| -3.0 * rng.uniform()).collect();
    let old = logprobs
        .iter()
        .map(|l| l + 0.2 * (rng.uniform() - 0.5))
        .collect();
    let rewards: Vec<f64> = (0..b).map(|_| (rng.uniform() < 0.3) as u8 as f64).collect();
    let gid: Vec<i64> = (0..b).map(|i| (i / group) as i64).collect();
    let adv =
        calibrl::rarity::group_advantages(&Config::default(), &rewards, &gid, prompts, None, None)
            .unwrap();
    let e_len = seq_len / 2;
    LossBatch {
        rows,
        logprobs,
        mask: (0..tokens)
            .map(|k| ((k % seq_len) < seq_len - 3) as u8 as f64)
            .collect(),
        old_logprobs: Some(old),
        advantages: adv.advantages,
        weights: adv.weights,
        signs: adv.signs,
        expert: Some(ExpertBaseline {
            rows: (0..prompts).map(|p| p * e_len..(p + 1) * e_len).collect(),
            logprobs: (0..prompts * e_len).map(|_| -rng.uniform()).collect(),
            mask: vec![1.0; prompts * e_len],
            index: gid,
        }),
        ..Default::default()
    }
}

/// The non-fused loss: each term a separate pass with its own intermediate arrays.
fn naive_loss(cfg: &Config, b: &LossBatch) -> (f64, Vec<f64>) {
    let n = b.logprobs.len();
    let old = b.old_logprobs.as_ref().unwrap();
    let row_of: Vec<usize> = b
        .rows
        .iter()
        .enumerate()
        .flat_map(|(i, r)| std::iter::repeat(i).take(r.len()))
        .collect();
    let adv: Vec<f64> = row_of.iter().map(|&i| b.advantages[i]).collect();
    let ratio: Vec<f64> = (0..n).map(|k| (b.logprobs[k] - old[k]).exp()).collect();
    let p1: Vec<f64> = (0..n).map(|k| -adv[k] * ratio[k]).collect();
    let clipped: Vec<f64> = ratio
        .iter()
        .map(|r| r.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high))
        .collect();
    let p2: Vec<f64> = (0..n).map(|k| -adv[k] * clipped[k]).collect();
    let pc: Vec<f64> = (0..n).map(|k| p1[k].max(p2[k])).collect();
    let cap: Vec<f64> = (0..n).map(|k| -adv[k] * cfg.dual_clip).collect();
    let p: Vec<f64> = (0..n)
        .map(|k| {
            if adv[k] < 0.0 {
                pc[k].min(cap[k])
            } else {
                pc[k]
            }
        })
        .collect();
    let ntok: f64 = b.mask.iter().sum();
    let pg: f64 = (0..n).map(|k| p[k] * b.mask[k]).sum::<f64>() / ntok;
    let dp: Vec<f64> = (0..n)
        .map(|k| {
            if p2[k] > p1[k] || (adv[k] < 0.0 && pc[k] > cap[k]) {
                0.0
            } else {
                -adv[k] * ratio[k] * b.mask[k] / ntok
            }
        })
        .collect();
    let masked: Vec<f64> = (0..n).map(|k| b.logprobs[k] * b.mask[k]).collect();
    let s: Vec<f64> = b
        .rows
        .iter()
        .map(|r| masked[r.clone()].iter().sum())
        .collect();
    let e = b.expert.as_ref().unwrap();
    let e_sum: Vec<f64> = e
        .rows
        .iter()
        .map(|r| r.clone().map(|k| e.logprobs[k] * e.mask[k]).sum())
        .collect();
    let delta: Vec<f64> = (0..b.rows.len())
        .map(|i| s[i] - e_sum[e.index[i] as usize])
        .collect();
    let x: Vec<f64> = (0..b.rows.len()).map(|i| -b.signs[i] * delta[i]).collect();
    let phi: Vec<f64> = x
        .iter()
        .map(|&x| if x > 0.0 { x } else { cfg.alpha * x })
        .collect();
    let dphi: Vec<f64> = x
        .iter()
        .map(|&x| if x > 0.0 { 1.0 } else { cfg.alpha })
        .collect();
    let nseq = b.rows.len() as f64;
    let explore: f64 = (0..b.rows.len())
        .map(|i| b.weights[i] * phi[i])
        .sum::<f64>()
        / nseq;
    let coef: Vec<f64> = (0..b.rows.len())
        .map(|i| cfg.lambda * b.weights[i] * dphi[i] * -b.signs[i] / nseq)
        .collect();
    let grad: Vec<f64> = (0..n)
        .map(|k| dp[k] + coef[row_of[k]] * b.mask[k])
        .collect();
    (pg + cfg.lambda * explore, grad)
}

/// The non-fused logits path: materialise u, log-softmax, probabilities, then gather and
/// reduce; the backward materialises the probabilities again into a separate buffer.
fn naive_logits(
    logits: &[bf16],
    labels: &[i64],
    n: usize,
    v: usize,
    g: &[f32],
    h: &[f32],
    out: &mut [bf16],
) -> f64 {
    let out_ptr = out.as_mut_ptr() as usize;
    let acc = std::sync::Mutex::new(0f64);
    for_row_chunks(n, 16, |b, e| {
        let mut local = 0f64;
        for k in b..e {
            let u: Vec<f32> = logits[k * v..(k + 1) * v]
                .iter()
                .map(|z| z.to_f32())
                .collect();
            let m = u.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let lse = m + u.iter().map(|x| (x - m).exp()).sum::<f32>().ln();
            let logp: Vec<f32> = u.iter().map(|x| x - lse).collect();
            let p: Vec<f32> = logp.iter().map(|x| x.exp()).collect();
            let ent: f32 = -p.iter().zip(&logp).map(|(p, l)| p * l).sum::<f32>();
            local += (logp[labels[k] as usize] + ent) as f64;
            let dst =
                unsafe { std::slice::from_raw_parts_mut((out_ptr as *mut bf16).add(k * v), v) };
            for j in 0..v {
                let onehot = (j as i64 == labels[k]) as u8 as f32;
                dst[j] = bf16::from_f32(g[k] * (onehot - p[j]) - h[k] * p[j] * (logp[j] + ent));
            }
        }
        *acc.lock().unwrap() += local;
    });
    acc.into_inner().unwrap()
}

fn bench_logits(n: usize, v: usize) {
    let mut rng = Rng(3);
    let logits: Vec<bf16> = (0..n * v)
        .map(|_| bf16::from_f64(rng.uniform() * 8.0 - 4.0))
        .collect();
    let mut labels: Vec<i64> = (0..n).map(|_| (rng.uniform() * v as f64) as i64).collect();
    let mut g: Vec<f32> = (0..n).map(|_| rng.uniform() as f32 - 0.5).collect();
    let mut h: Vec<f32> = (0..n)
        .map(|_| 0.01 * (rng.uniform() as f32 - 0.5))
        .collect();
    let (mut lp, mut ent, mut lse) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    let mut work = logits.clone();
    let fused = median_time(5, || {
        work.copy_from_slice(&logits); // in place: restore the logits each run (timed in both)
        let mut tl = HostTensor::bf16(&mut work, &[n, v]);
        let tlab = HostTensor::i64(&mut labels, &[n]);
        let (mut a, mut b, mut c) = (
            HostTensor::f32(&mut lp, &[n]),
            HostTensor::f32(&mut ent, &[n]),
            HostTensor::f32(&mut lse, &[n]),
        );
        let (tg, th) = (HostTensor::f32(&mut g, &[n]), HostTensor::f32(&mut h, &[n]));
        unsafe {
            assert_eq!(
                calibrl_logits_forward(
                    tl.as_ptr(),
                    tlab.as_ptr(),
                    1.0,
                    a.as_mut_ptr(),
                    b.as_mut_ptr(),
                    c.as_mut_ptr(),
                    null_mut()
                ),
                calibrl::CalibrlStatus::Ok
            );
            assert_eq!(
                calibrl_logits_backward(
                    tl.as_ptr(),
                    tlab.as_ptr(),
                    1.0,
                    0,
                    c.as_ptr(),
                    b.as_ptr(),
                    tg.as_ptr(),
                    th.as_ptr(),
                    tl.as_mut_ptr(),
                    null_mut()
                ),
                calibrl::CalibrlStatus::Ok
            );
        }
        let _ = null::<u8>();
    });
    let mut out = logits.clone();
    let naive = median_time(5, || {
        work.copy_from_slice(&logits);
        black_box(naive_logits(&work, &labels, n, v, &g, &h, &mut out));
    });
    // Agreement check: the two d-logits must match to bf16 rounding.
    work.copy_from_slice(&logits);
    {
        let mut tl = HostTensor::bf16(&mut work, &[n, v]);
        let tlab = HostTensor::i64(&mut labels, &[n]);
        let (mut a, mut b, mut c) = (
            HostTensor::f32(&mut lp, &[n]),
            HostTensor::f32(&mut ent, &[n]),
            HostTensor::f32(&mut lse, &[n]),
        );
        let (tg, th) = (HostTensor::f32(&mut g, &[n]), HostTensor::f32(&mut h, &[n]));
        unsafe {
            calibrl_logits_forward(
                tl.as_ptr(),
                tlab.as_ptr(),
                1.0,
                a.as_mut_ptr(),
                b.as_mut_ptr(),
                c.as_mut_ptr(),
                null_mut(),
            );
            calibrl_logits_backward(
                tl.as_ptr(),
                tlab.as_ptr(),
                1.0,
                0,
                c.as_ptr(),
                b.as_ptr(),
                tg.as_ptr(),
                th.as_ptr(),
                tl.as_mut_ptr(),
                null_mut(),
            );
        }
    }
    naive_logits(&logits, &labels, n, v, &g, &h, &mut out);
    let max_diff = work
        .iter()
        .zip(&out)
        .map(|(a, b)| (a.to_f32() - b.to_f32()).abs())
        .fold(0f32, f32::max);
    println!(
        "logits fwd+bwd bf16 N={n:<5} V={v:<6} | calibrl {:>9.0} rows/s | non-fused {:>9.0} rows/s | speed-up {:>5.2}x | max |Δ d-logits| {max_diff:.1e}",
        n as f64 / fused,
        n as f64 / naive,
        naive / fused
    );
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let threads = std::thread::available_parallelism()
        .map(|p| p.get())
        .unwrap_or(1);
    println!("calibrl CPU backend benchmark ({threads} threads; median of 5 after a warm-up)");
    let cfg = Config::default();
    for &tokens in if quick {
        &[1 << 16][..]
    } else {
        &[1 << 18, 1 << 20][..]
    } {
        let batch = loss_batch(tokens, 256, 8);
        let fused = median_time(5, || {
            black_box(compute(&cfg, &batch).unwrap());
        });
        let naive = median_time(5, || {
            black_box(naive_loss(&cfg, &batch));
        });
        let (a, b) = (compute(&cfg, &batch).unwrap(), naive_loss(&cfg, &batch));
        let max_diff = a
            .grad_logprobs
            .iter()
            .zip(&b.1)
            .map(|(x, y)| (x - y).abs())
            .fold(0f64, f64::max);
        println!(
            "loss (paper preset, f64) T={tokens:<8} | calibrl {:>6.1} Mtok/s | non-fused {:>6.1} Mtok/s | speed-up {:>5.2}x | |Δ loss| {:.1e} max |Δ grad| {max_diff:.1e}",
            tokens as f64 / fused / 1e6,
            tokens as f64 / naive / 1e6,
            naive / fused,
            (a.metrics.loss - b.0).abs()
        );
    }
    let n = if quick { 64 } else { 512 };
    for v in [32000, 152064] {
        bench_logits(n, v);
    }
}
