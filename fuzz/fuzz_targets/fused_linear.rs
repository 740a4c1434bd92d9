//! calibrl_fused_linear_forward, _shard_stats, _backward and _forward_backward: shapes,
//! dtypes, strides, chunk sizes, workspaces (too small, misaligned, overlapping) and NULLs
//! drawn from the bytes. Every call must return a known status with a message on failure,
//! write nothing on failure, and write only finite values on success.
#![no_main]

use calibrl::ffi::linear::*;
use calibrl_fuzz::*;
use libfuzzer_sys::fuzz_target;

const PARAMS: [(u8, u8); 3] = [F32, BF16, F16];

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes::new(data);
    let n = b.below(5);
    let h = 1 + b.below(9);
    let v = 1 + b.below(24);
    let labels: Vec<f64> = (0..n)
        .map(|_| match b.u8() % 8 {
            0 => -1.0,
            1 => b.count(2 * v) as f64,
            _ => b.below(v) as f64,
        })
        .collect();
    let Some(hidden) = FTensor::build(&mut b, &Want::input(&PARAMS, &[n, h]), true) else {
        return;
    };
    let Some(weight) = FTensor::build(&mut b, &Want::input(&PARAMS, &[v, h]), true) else {
        return;
    };
    let Some(bias) = optional(&mut b, &Want::input(&PARAMS, &[v]), true) else {
        return;
    };
    let Some(label_t) = FTensor::build(&mut b, &Want::input(&[I64, I32], &[n]).with(&labels), true)
    else {
        return;
    };
    let chunk = if b.rare(8) { b.count(4) } else { 1 + b.below(n + 2) as i64 };
    // Usually a workspace of the right size; sometimes short or oddly typed.
    let ws_len = chunk.clamp(1, 64) as usize * v + 4;
    let ws_len = if b.rare(6) { b.below(ws_len) } else { ws_len };
    let Some(mut ws) = FTensor::build(&mut b, &Want::input(&[F32, U8], &[ws_len]), true) else {
        return;
    };
    let temperature = if b.rare(6) { b.float() } else { [1.0, 0.7, 2.0][b.below(3)] };
    let vocab_start = if b.rare(6) { b.count(v) } else { 0 };
    let input = CalibrlLinearInput {
        hidden: hidden.ptr(),
        weight: weight.ptr(),
        bias: ptr_of(&bias),
        labels: label_t.ptr(),
        temperature,
        vocab_start,
        chunk_size: chunk,
        workspace: ws.mptr(),
    };
    let inputs = [Some(&hidden), Some(&weight), bias.as_ref(), Some(&label_t)];
    let null = std::ptr::null_mut();
    match b.below(4) {
        0 => {
            let Some((mut lp, mut ent, mut lse)) = row_outputs(&mut b, n) else {
                return;
            };
            let mut tensors = inputs.to_vec();
            tensors.extend([Some(&lp), ent.as_ref(), Some(&lse)]);
            let before = snapshot(&tensors);
            let st = unsafe {
                calibrl_fused_linear_forward(&input, lp.mptr(), mptr_of(&mut ent), lse.mptr(), null)
            } as i32;
            let mut tensors = inputs.to_vec();
            tensors.extend([Some(&lp), ent.as_ref(), Some(&lse)]);
            check("fused_linear_forward", st, &tensors, &before, None);
        }
        1 => {
            let Some(mut stats) = FTensor::build(&mut b, &Want::output(&[F32], &[n, 4]), true)
            else {
                return;
            };
            let mut tensors = inputs.to_vec();
            tensors.push(Some(&stats));
            let before = snapshot(&tensors);
            let st =
                unsafe { calibrl_fused_linear_shard_stats(&input, stats.mptr(), null) } as i32;
            let mut tensors = inputs.to_vec();
            tensors.push(Some(&stats));
            check("fused_linear_shard_stats", st, &tensors, &before, None);
        }
        mode => {
            let rows = Want::input(&FLOATS, &[n]);
            let Some(g) = FTensor::build(&mut b, &rows, true) else {
                return;
            };
            let Some(gh) = optional(&mut b, &rows, true) else {
                return;
            };
            let Some(mut dh) = FTensor::build(&mut b, &Want::output(&FLOATS, &[n, h]), true) else {
                return;
            };
            let Some(mut dw) = FTensor::build(&mut b, &Want::output(&[F32, BF16], &[v, h]), true)
            else {
                return;
            };
            let Some(mut db) = optional(&mut b, &Want::output(&[F32], &[v]), true) else {
                return;
            };
            let accumulate = b.u8() as i32 % 2;
            if mode == 2 {
                let Some(lse) = FTensor::build(&mut b, &rows, true) else {
                    return;
                };
                let Some(ent) = optional(&mut b, &rows, true) else {
                    return;
                };
                let mut tensors = inputs.to_vec();
                tensors.extend([Some(&lse), ent.as_ref(), Some(&g), gh.as_ref()]);
                tensors.extend([Some(&dh), Some(&dw), db.as_ref()]);
                let before = snapshot(&tensors);
                let st = unsafe {
                    calibrl_fused_linear_backward(
                        &input,
                        lse.ptr(),
                        ptr_of(&ent),
                        g.ptr(),
                        ptr_of(&gh),
                        dh.mptr(),
                        dw.mptr(),
                        mptr_of(&mut db),
                        accumulate,
                        null,
                    )
                } as i32;
                let mut tensors = inputs.to_vec();
                tensors.extend([Some(&lse), ent.as_ref(), Some(&g), gh.as_ref()]);
                tensors.extend([Some(&dh), Some(&dw), db.as_ref()]);
                check("fused_linear_backward", st, &tensors, &before, None);
            } else {
                let Some((mut lp, mut ent, mut lse)) = row_outputs(&mut b, n) else {
                    return;
                };
                let mut tensors = inputs.to_vec();
                tensors.extend([Some(&g), gh.as_ref(), Some(&lp), ent.as_ref(), Some(&lse)]);
                tensors.extend([Some(&dh), Some(&dw), db.as_ref()]);
                let before = snapshot(&tensors);
                let st = unsafe {
                    calibrl_fused_linear_forward_backward(
                        &input,
                        g.ptr(),
                        ptr_of(&gh),
                        lp.mptr(),
                        mptr_of(&mut ent),
                        lse.mptr(),
                        dh.mptr(),
                        dw.mptr(),
                        mptr_of(&mut db),
                        accumulate,
                        null,
                    )
                } as i32;
                let mut tensors = inputs.to_vec();
                tensors.extend([Some(&g), gh.as_ref(), Some(&lp), ent.as_ref(), Some(&lse)]);
                tensors.extend([Some(&dh), Some(&dw), db.as_ref()]);
                check("fused_linear_forward_backward", st, &tensors, &before, None);
            }
        }
    }
});
