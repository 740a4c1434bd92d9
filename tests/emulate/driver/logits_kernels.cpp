// cuda/logits.cu compiled for the host, its kernels registered with the emulated driver (the
// list of src/cuda/logits/source.rs `LOGITS.kernels`). The host takes the file's pre-sm_80 branches
// (max_nan, f32_to_bf16 in plain C instead of max.NaN / cvt.rn.bf16).
#include "../cuda_host.h"
#include "host_cvt.h"
#include "logits.cu"  // from cuda/, or CALIBRL_EMULATE_KERNEL_DIR
#include "kernels.h"

EMU_KERNEL(calibrl_logits_forward_bf16)
EMU_KERNEL(calibrl_logits_forward_f16)
EMU_KERNEL(calibrl_logits_forward_f32)
EMU_KERNEL(calibrl_logits_backward_bf16)
EMU_KERNEL(calibrl_logits_backward_f16)
EMU_KERNEL(calibrl_logits_backward_f32)
EMU_KERNEL(calibrl_logits_shard_stats_bf16)
EMU_KERNEL(calibrl_logits_shard_stats_f16)
EMU_KERNEL(calibrl_logits_shard_stats_f32)
EMU_KERNEL(calibrl_logits_shard_finish)
EMU_KERNEL(calibrl_logits_single_pass_bf16)
EMU_KERNEL(calibrl_logits_single_pass_f16)
EMU_KERNEL(calibrl_logits_single_pass_f32)
