// calibrl.hpp — header-only C++17 wrapper over the calibrl C ABI (include/calibrl.h).
//
// Link only libcalibrl.so (or libcalibrl.a); this header adds no symbols of its own.
//
//   calibrl::Config cfg = calibrl::Config::preset("paper");
//   calibrl_metrics m = calibrl::loss(cfg, calibrl::LossArgs{}
//       .logprobs(lp, offsets).old_logprobs(old).advantages(adv).weights(w).signs(sign)
//       .expert(expert_lp, expert_offsets, expert_index).grad_logprobs(grad));
//
// Conventions:
//  - every failing C call throws calibrl::Error, carrying the status and the library's message
//    (which names the offending argument);
//  - calibrl::TensorView describes a caller buffer as a DLPack DLTensor without copying it; the
//    buffer must outlive every call that uses the view;
//  - handles (calibrl::Config, calibrl::Plan) are RAII and move-only; capi() exposes the raw C
//    pointer;
//  - the scheduler (calibrl::Plan, SPEC §7) returns its data as std::vectors: the wrapper does
//    the ABI's size query + read for you.
//
// PyTorch: when <ATen/ATen.h> is reachable (or CALIBRL_WITH_TORCH is defined) TensorView also
// wraps an at::Tensor (CPU or CUDA, any strides) in place. Define CALIBRL_NO_TORCH to opt out.
//
// The wrapper is split by concept into calibrl/*.hpp (prelude, errors, config, tensor, loss,
// logits, linear, scheduler); this header includes them all. Include this one.

#ifndef CALIBRL_HPP
#define CALIBRL_HPP

#include "calibrl/errors.hpp"
#include "calibrl/config.hpp"
#include "calibrl/tensor.hpp"
#include "calibrl/loss.hpp"
#include "calibrl/logits.hpp"
#include "calibrl/linear.hpp"
#include "calibrl/scheduler.hpp"

#endif  // CALIBRL_HPP
