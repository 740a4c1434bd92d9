// calibrl expert family: the scheduler's helper that turns the no-grad pass's packed output into
// the expert baseline the loss takes (SPEC §7): each selected expert's token log-probs copied
// from its place in the no-grad output into its slot of the packed expert tensor, and its sum
// E_g (optionally divided by its length). One block per expert slot; fixed-order reductions.
// Like the loss family, tensors are read through a runtime dtype code, and no header is needed.

typedef long long i64;
typedef unsigned short u16;

#define DT_F32 0
#define DT_F64 1
#define DT_BF16 2
#define DT_F16 3

__device__ __forceinline__ double ld(const void* p, i64 code, i64 i) {
  switch (code) {
    case DT_F32: return (double)((const float*)p)[i];
    case DT_F64: return ((const double*)p)[i];
    case DT_BF16: return (double)__uint_as_float(((unsigned)((const u16*)p)[i]) << 16);
    default: {
      float f;
      asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(((const u16*)p)[i]));
      return (double)f;
    }
  }
}

__device__ __forceinline__ void st(void* p, i64 code, i64 i, double v) {
  u16 r;
  switch (code) {
    case DT_F32: ((float*)p)[i] = (float)v; break;
    case DT_F64: ((double*)p)[i] = v; break;
    case DT_BF16: asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"((float)v)); ((u16*)p)[i] = r; break;
    default: asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"((float)v)); ((u16*)p)[i] = r; break;
  }
}

struct ExpertParams {
  const void* nograd; i64 nograd_dt;
  void* expert_logprobs; i64 expert_dt;  // may be null
  void* expert_sums; i64 sums_dt;        // may be null
  const i64* source;                     // [slots]: start in `nograd`, −1 if not in this part
  const i64* offsets;                    // [slots + 1]: the packed expert layout
  i64 slots, length_normalize;
};

extern "C" __global__ void calibrl_collect_experts(ExpertParams p) {
  __shared__ double partial[32];
  for (i64 s = blockIdx.x; s < p.slots; s += gridDim.x) {
    const i64 o0 = p.offsets[s], len = p.offsets[s + 1] - o0, src = p.source[s];
    double sum = 0.0;
    for (i64 t = threadIdx.x; t < len; t += blockDim.x) {
      const double v = src >= 0 ? ld(p.nograd, p.nograd_dt, src + t) : 0.0;
      if (p.expert_logprobs) st(p.expert_logprobs, p.expert_dt, o0 + t, v);
      sum += v;
    }
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_down_sync(0xffffffffu, sum, o);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = sum;
    __syncthreads();
    if (threadIdx.x == 0) {
      double total = 0.0;
      for (int w = 0; w < (int)(blockDim.x >> 5); ++w) total += partial[w];
      if (p.length_normalize && len > 0) total /= (double)len;
      if (p.expert_sums) st(p.expert_sums, p.sums_dt, s, total);
    }
    __syncthreads();
  }
}
