//! Borrowed DLPack tensors: the `DLTensor` descriptor every ABI call takes, and `Tensor`, a
//! validated view of one that knows its argument name (so every error can name it).
//!
//! - `dlpack`: the descriptor structs (layout-identical to DLPack's, `dlpack.h` v0.6 through
//!   v1.x: a caller that already has a `DLTensor` from PyTorch, JAX or CuPy passes it as is),
//!   the dtypes and devices;
//! - `view`: `Tensor`, the validated view, and its shape, dtype and device checks;
//! - `host`: reading and writing host tensors as f64 (the dtype conversions), and
//!   `HostTensor`, a descriptor over a Rust slice;
//! - `overlap`: which views share memory (outputs must not);
//! - `alloc`: working memory asked for fallibly (an error status, never an abort).

mod alloc;
mod dlpack;
mod host;
mod overlap;
mod view;

pub use alloc::{out_of_memory, try_collect, try_vec};
pub use dlpack::{
    DLDataType, DLDevice, DLTensor, DType, Device, DL_CPU, DL_CUDA, DL_CUDA_HOST, DL_CUDA_MANAGED,
};
pub use host::{write_all, HostTensor};
pub use overlap::require_disjoint;
pub use view::{common_device, compact_strides, Tensor};
