// cuda/loss.cu compiled for the host, its kernels registered with the emulated driver (the list
// of src/cuda/loss/source.rs `LOSS.kernels`; cuModuleGetFunction also requires each in the PTX).
#include "../cuda_host.h"
#include "host_cvt.h"
#include "loss.cu"  // from cuda/, or CALIBRL_EMULATE_KERNEL_DIR (scripts/emulate-kernels.sh)
#include "kernels.h"

EMU_KERNEL(calibrl_group_stats)
EMU_KERNEL(calibrl_group_advantages)
EMU_KERNEL(calibrl_loss_counts)
EMU_KERNEL(calibrl_loss_f32)
EMU_KERNEL(calibrl_loss_f64)
EMU_KERNEL(calibrl_loss_bf16)
EMU_KERNEL(calibrl_loss_f16)
EMU_KERNEL(calibrl_loss_any)
EMU_KERNEL(calibrl_collect_experts)
EMU_KERNEL(calibrl_cov_prepare)
EMU_KERNEL(calibrl_cov_histogram)
EMU_KERNEL(calibrl_loss_rows)
