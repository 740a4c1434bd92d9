//! Scheduler exports (SPEC §7): build a `calibrl_plan` from plain C arrays, then read every part
//! of it with query functions that fill caller-provided arrays.
//!
//! Array queries share one convention: `len` receives the element count; when the output
//! array(s) are NULL the call is a size query (status OK, only `*len` written); when `cap` is
//! smaller than the count nothing but `*len` is written and the status is
//! `CALIBRL_STATUS_BUFFER_TOO_SMALL`.
//!
//! Sequence ids: rollout `i` (numbered `0..R` in input order) is id `i`; expert slot `s`
//! (numbered `0..P*` over the prompts whose expert is selected, in prompt order) is id `R + s`.
//!
//! Files: `types` (constants, the `#[repr(C)]` structures and the plan handle), `build` (configuration and
//! `calibrl_plan_new`/`_free`), `info` (fixed-size queries), `arrays` (array queries),
//! `experts` (the expert collection on tensors).

mod arrays;
mod build;
mod experts;
mod info;
mod types;

pub use arrays::*;
pub use build::*;
pub use experts::*;
pub use info::*;
pub use types::*;
