//! The C ABI as a consumer sees it: `target/<profile>/libcalibrl.so` loaded with libloading,
//! every function declared here by hand, every `DLTensor` built by hand. Bad input of every kind
//! gets the right status and a message naming the argument, and leaves every output untouched.

mod common;

use common::{reference, DLTensor, Dt, Rng, Tensor};
use libloading::Library;
use std::ffi::{c_char, c_void, CStr, CString};
use std::sync::OnceLock;

// Status numbers of include/calibrl.h.
const OK: i32 = 0;
const NULL_ARGUMENT: i32 = 1;
const INVALID_ARGUMENT: i32 = 2;
const SHAPE_MISMATCH: i32 = 3;
const DTYPE_MISMATCH: i32 = 4;
const DEVICE_MISMATCH: i32 = 5;
const NON_FINITE: i32 = 6;
const INVALID_CONFIG: i32 = 7;
const CUDA_UNAVAILABLE: i32 = 8;
const BUFFER_TOO_SMALL: i32 = 11;

#[repr(C)]
#[derive(Clone, Copy)]
struct AdvArgs {
    rewards: *const DLTensor,
    group_ids: *const DLTensor,
    num_groups: i64,
    correct: *const DLTensor,
    is_expert: *const DLTensor,
    advantages: *mut DLTensor,
    weights: *mut DLTensor,
    signs: *mut DLTensor,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
struct Normalizers {
    token_count: f64,
    seq_count: f64,
    all_token_count: f64,
    all_seq_count: f64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct LossArgs {
    logprobs: *const DLTensor,
    seq_offsets: *const DLTensor,
    mask: *const DLTensor,
    old_logprobs: *const DLTensor,
    ref_logprobs: *const DLTensor,
    entropy: *const DLTensor,
    advantages: *const DLTensor,
    weights: *const DLTensor,
    signs: *const DLTensor,
    is_expert: *const DLTensor,
    expert_logprobs: *const DLTensor,
    expert_offsets: *const DLTensor,
    expert_mask: *const DLTensor,
    expert_index: *const DLTensor,
    normalizers: *const Normalizers,
    grad_logprobs: *mut DLTensor,
    grad_entropy: *mut DLTensor,
    metrics: *mut DLTensor,
    token_weights: *const DLTensor,
}

type Cfg = *mut c_void;
type Stream = *mut c_void;

/// The exports, declared as a consumer would (signatures of include/calibrl.h).
#[allow(clippy::type_complexity)]
struct Api {
    version: unsafe extern "C" fn() -> *const c_char,
    abi_version: unsafe extern "C" fn() -> u32,
    last_error: unsafe extern "C" fn() -> *const c_char,
    status_name: unsafe extern "C" fn(i32) -> *const c_char,
    config_new: unsafe extern "C" fn(*const c_char, *mut Cfg) -> i32,
    config_free: unsafe extern "C" fn(Cfg),
    config_to_json: unsafe extern "C" fn(Cfg, *mut c_char, usize, *mut usize) -> i32,
    group_advantages: unsafe extern "C" fn(Cfg, *const AdvArgs, Stream) -> i32,
    loss: unsafe extern "C" fn(Cfg, *const LossArgs, *mut [f64; 16], Stream) -> i32,
    logits_forward: unsafe extern "C" fn(
        *const DLTensor,
        *const DLTensor,
        f64,
        *mut DLTensor,
        *mut DLTensor,
        *mut DLTensor,
        Stream,
    ) -> i32,
    logits_backward: unsafe extern "C" fn(
        *const DLTensor,
        *const DLTensor,
        f64,
        i64,
        *const DLTensor,
        *const DLTensor,
        *const DLTensor,
        *const DLTensor,
        *mut DLTensor,
        Stream,
    ) -> i32,
    shard_stats: unsafe extern "C" fn(
        *const DLTensor,
        *const DLTensor,
        f64,
        i64,
        *mut DLTensor,
        Stream,
    ) -> i32,
    shard_finish: unsafe extern "C" fn(
        *const DLTensor,
        *const DLTensor,
        *mut DLTensor,
        *mut DLTensor,
        *mut DLTensor,
        Stream,
    ) -> i32,
    _lib: Library,
}

fn api() -> &'static Api {
    static API: OnceLock<Api> = OnceLock::new();
    API.get_or_init(|| unsafe {
        let lib = Library::new(common::cdylib_path()).expect("load libcalibrl");
        macro_rules! sym {
            ($name:literal) => {
                *lib.get(concat!($name, "\0").as_bytes()).expect($name)
            };
        }
        Api {
            version: sym!("calibrl_version"),
            abi_version: sym!("calibrl_abi_version"),
            last_error: sym!("calibrl_last_error_message"),
            status_name: sym!("calibrl_status_name"),
            config_new: sym!("calibrl_config_new"),
            config_free: sym!("calibrl_config_free"),
            config_to_json: sym!("calibrl_config_to_json"),
            group_advantages: sym!("calibrl_group_advantages"),
            loss: sym!("calibrl_loss"),
            logits_forward: sym!("calibrl_logits_forward"),
            logits_backward: sym!("calibrl_logits_backward"),
            shard_stats: sym!("calibrl_logits_shard_stats"),
            shard_finish: sym!("calibrl_logits_shard_finish"),
            _lib: lib,
        }
    })
}

fn last_error() -> String {
    unsafe {
        CStr::from_ptr((api().last_error)())
            .to_string_lossy()
            .into_owned()
    }
}

fn new_cfg(json: &str) -> Result<Cfg, (i32, String)> {
    let c = CString::new(json).unwrap();
    let mut cfg: Cfg = std::ptr::null_mut();
    let st = unsafe { (api().config_new)(c.as_ptr(), &mut cfg) };
    if st == OK {
        assert!(!cfg.is_null());
        Ok(cfg)
    } else {
        assert!(cfg.is_null(), "handle written on failure");
        Err((st, last_error()))
    }
}

#[track_caller]
fn expect_error(st: i32, want: i32, name: &str, what: &str) {
    let msg = last_error();
    assert_eq!(
        st, want,
        "{what}: status {st} (want {want}), message: {msg}"
    );
    assert!(
        msg.contains(&format!("`{name}")),
        "{what}: message does not name `{name}`: {msg}"
    );
}

const SENTINEL: f64 = 12345.5;

/// The CUDA_UNAVAILABLE checks pass host memory labelled as CUDA memory: only meaningful (and
/// only safe) where no CUDA driver can be loaded. Elsewhere they are skipped with a message.
fn no_cuda_driver() -> bool {
    let absent = !calibrl::cuda::driver_available();
    if !absent {
        println!("skipped the CUDA_UNAVAILABLE checks: a CUDA driver is present");
    }
    absent
}

fn untouched(t: &Tensor) -> bool {
    t.to_vec().iter().all(|&v| v == SENTINEL)
}

#[test]
fn version_and_abi_version() {
    let v = unsafe { CStr::from_ptr((api().version)()) }
        .to_str()
        .unwrap();
    assert_eq!(v, env!("CARGO_PKG_VERSION"));
    assert_eq!(unsafe { (api().abi_version)() }, 4);
    let header =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/include/calibrl.h")).unwrap();
    assert!(header.contains("#define CALIBRL_ABI_VERSION 4"));
    for (st, name) in [
        (0, "CALIBRL_STATUS_OK"),
        (3, "CALIBRL_STATUS_SHAPE_MISMATCH"),
        (7, "CALIBRL_STATUS_INVALID_CONFIG"),
        (8, "CALIBRL_STATUS_CUDA_UNAVAILABLE"),
        (11, "CALIBRL_STATUS_BUFFER_TOO_SMALL"),
    ] {
        let s = unsafe { CStr::from_ptr((api().status_name)(st)) }
            .to_str()
            .unwrap();
        assert_eq!(s, name);
        assert!(
            header.contains(&format!("{name} = {st}")),
            "{name} = {st} in the header"
        );
    }
}

#[test]
fn config_errors_name_the_key() {
    let cases = [
        (r#"{"lamda":0.1}"#, "lamda"),
        (r#"{"lambda":"0.1"}"#, "lambda"),
        (r#"{"lambda":-1}"#, "lambda"),
        (r#"{"alpha":1.5}"#, "alpha"),
        (r#"{"clip_low":1.0}"#, "clip_low"),
        (r#"{"activation":"gelu"}"#, "activation"),
        (r#"{"agg":"seq-mean-token-sum-norm"}"#, "t_norm"),
        (r#"{"agg":"token-mean","t_norm":-3}"#, "t_norm"),
        (r#"{"norm_by_std":1}"#, "norm_by_std"),
        (r#"{"preset":"ppo"}"#, "preset"),
        (r#"{"kl_kind":"k4"}"#, "kl_kind"),
        (r#"{"luffy_gamma":0}"#, "luffy_gamma"),
        (r#"{"adv_eps":0}"#, "adv_eps"),
    ];
    for (json, key) in cases {
        let (st, msg) = new_cfg(json)
            .err()
            .unwrap_or_else(|| panic!("{json} accepted"));
        assert_eq!(st, INVALID_CONFIG, "{json}: {msg}");
        assert!(msg.contains(&format!("`{key}`")), "{json}: {msg}");
    }
    for bad in ["{", "[1]", "nul"] {
        assert_eq!(new_cfg(bad).err().unwrap().0, INVALID_CONFIG, "{bad}");
    }
    // NULL out.
    let st = unsafe { (api().config_new)(c"{}".as_ptr(), std::ptr::null_mut()) };
    expect_error(st, NULL_ARGUMENT, "out", "config_new(out = NULL)");
    // NULL json = the paper preset; free(NULL) is a no-op.
    let mut cfg: Cfg = std::ptr::null_mut();
    assert_eq!(
        unsafe { (api().config_new)(std::ptr::null(), &mut cfg) },
        OK
    );
    unsafe {
        (api().config_free)(cfg);
        (api().config_free)(std::ptr::null_mut());
    }
}

#[test]
fn config_to_json_with_a_small_buffer() {
    let cfg = new_cfg(r#"{"preset":"reference","lambda":0.25}"#).unwrap();
    let mut len = 0usize;
    let mut buf = vec![b'x' as c_char; 16];
    let st = unsafe { (api().config_to_json)(cfg, buf.as_mut_ptr(), buf.len(), &mut len) };
    expect_error(st, BUFFER_TOO_SMALL, "buf", "to_json small");
    assert!(len > 16, "needed length reported: {len}");
    assert!(
        buf.iter().all(|&c| c == b'x' as c_char),
        "small buffer written"
    );
    // Exactly len bytes is still one short (NUL).
    let mut buf = vec![b'x' as c_char; len];
    let mut len2 = 0;
    let st = unsafe { (api().config_to_json)(cfg, buf.as_mut_ptr(), buf.len(), &mut len2) };
    assert_eq!(st, BUFFER_TOO_SMALL);
    assert!(buf.iter().all(|&c| c == b'x' as c_char));
    let mut buf = vec![b'x' as c_char; len + 1];
    let st = unsafe { (api().config_to_json)(cfg, buf.as_mut_ptr(), buf.len(), &mut len2) };
    assert_eq!(st, OK, "{}", last_error());
    assert_eq!(len2, len);
    let json = unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_str()
        .unwrap()
        .to_string();
    let parsed = calibrl::Config::from_json(&json).unwrap();
    assert_eq!(
        parsed,
        common::config(r#"{"preset":"reference","lambda":0.25}"#)
    );
    // NULL len, NULL cfg.
    let st =
        unsafe { (api().config_to_json)(cfg, buf.as_mut_ptr(), buf.len(), std::ptr::null_mut()) };
    expect_error(st, NULL_ARGUMENT, "len", "to_json(len = NULL)");
    let st = unsafe {
        (api().config_to_json)(std::ptr::null_mut(), buf.as_mut_ptr(), buf.len(), &mut len2)
    };
    expect_error(st, NULL_ARGUMENT, "cfg", "to_json(cfg = NULL)");
    unsafe { (api().config_free)(cfg) };
}

#[test]
fn last_error_is_per_thread() {
    let (st, msg) = new_cfg(r#"{"bogus":1}"#).err().unwrap();
    assert_eq!(st, INVALID_CONFIG);
    assert!(msg.contains("bogus"));
    std::thread::spawn(|| {
        assert_eq!(last_error(), "", "another thread sees this thread's error");
        let _ = new_cfg(r#"{"other_thread_key":1}"#);
        assert!(last_error().contains("other_thread_key"));
    })
    .join()
    .unwrap();
    assert!(
        last_error().contains("bogus"),
        "this thread's message was overwritten: {}",
        last_error()
    );
    // A success clears it.
    let cfg = new_cfg("{}").unwrap();
    assert_eq!(last_error(), "");
    unsafe { (api().config_free)(cfg) };
}

// ---------------------------------------------------------------------------------------------
// Loss: one valid packed batch, then every kind of bad input
// ---------------------------------------------------------------------------------------------

struct LossBufs {
    logp: Tensor,
    offsets: Tensor,
    mask: Tensor,
    old: Tensor,
    refl: Tensor,
    ent: Tensor,
    adv: Tensor,
    w: Tensor,
    c: Tensor,
    elogp: Tensor,
    eoff: Tensor,
    eidx: Tensor,
    norm: Normalizers,
    grad: Tensor,
    gradh: Tensor,
    metrics: Tensor,
}

const T: usize = 9;
const B: usize = 3;

impl LossBufs {
    fn new() -> LossBufs {
        let mut rng = Rng::new(4);
        let v = |rng: &mut Rng, lo: f64, hi: f64, n: usize| {
            (0..n).map(|_| rng.range(lo, hi)).collect::<Vec<_>>()
        };
        LossBufs {
            logp: Tensor::new(&v(&mut rng, -2.0, -0.1, T), &[T], Dt::F32),
            offsets: Tensor::ints(&[0, 4, 4, T as i64], &[B + 1], Dt::I64),
            mask: Tensor::ints(&[1, 1, 0, 1, 1, 1, 1, 1, 0], &[T], Dt::U8),
            old: Tensor::new(&v(&mut rng, -2.0, -0.1, T), &[T], Dt::F32),
            refl: Tensor::new(&v(&mut rng, -2.0, -0.1, T), &[T], Dt::F32),
            ent: Tensor::new(&v(&mut rng, 0.0, 2.0, T), &[T], Dt::F32),
            adv: Tensor::new(&[0.5, -0.25, -0.25], &[B], Dt::F32),
            w: Tensor::new(&[0.5, 0.25, 0.25], &[B], Dt::F32),
            c: Tensor::new(&[1.0, -1.0, -1.0], &[B], Dt::F32),
            elogp: Tensor::new(&v(&mut rng, -2.0, -0.1, 7), &[7], Dt::F32),
            eoff: Tensor::ints(&[0, 3, 7], &[3], Dt::I32),
            eidx: Tensor::ints(&[0, -1, 1], &[B], Dt::I32),
            norm: Normalizers {
                token_count: 20.0,
                seq_count: 6.0,
                all_token_count: 0.0,
                all_seq_count: 0.0,
            },
            grad: Tensor::filled(SENTINEL, &[T], Dt::F32),
            gradh: Tensor::filled(SENTINEL, &[T], Dt::F64),
            metrics: Tensor::filled(SENTINEL, &[16], Dt::F64),
        }
    }
    fn args(&mut self) -> LossArgs {
        LossArgs {
            logprobs: self.logp.ptr(),
            seq_offsets: self.offsets.ptr(),
            mask: self.mask.ptr(),
            old_logprobs: self.old.ptr(),
            ref_logprobs: self.refl.ptr(),
            entropy: self.ent.ptr(),
            advantages: self.adv.ptr(),
            weights: self.w.ptr(),
            signs: self.c.ptr(),
            is_expert: std::ptr::null(),
            expert_logprobs: self.elogp.ptr(),
            expert_offsets: self.eoff.ptr(),
            expert_mask: std::ptr::null(),
            expert_index: self.eidx.ptr(),
            normalizers: &self.norm,
            grad_logprobs: self.grad.mptr(),
            grad_entropy: self.gradh.mptr(),
            metrics: self.metrics.mptr(),
            token_weights: std::ptr::null(),
        }
    }
    fn untouched(&self) -> bool {
        untouched(&self.grad) && untouched(&self.gradh) && untouched(&self.metrics)
    }
}

const JSON: &str = r#"{"preset":"paper","kl_coef":0.1,"entropy_coef":0.01}"#;

/// Calls `calibrl_loss` on the valid batch after `mutate` spoils it.
fn bad_loss(json: &str, mutate: impl FnOnce(&mut LossBufs, &mut LossArgs)) -> (i32, bool) {
    let cfg = new_cfg(json).unwrap();
    let mut bufs = LossBufs::new();
    let mut args = bufs.args();
    mutate(&mut bufs, &mut args);
    let mut host = [SENTINEL; 16];
    let st = unsafe { (api().loss)(cfg, &args, &mut host, std::ptr::null_mut()) };
    let ok = bufs.untouched() && host.iter().all(|&v| v == SENTINEL);
    unsafe { (api().config_free)(cfg) };
    (st, ok)
}

#[test]
fn loss_valid_call_matches_the_reference() {
    let cfg = new_cfg(JSON).unwrap();
    let mut bufs = LossBufs::new();
    let args = bufs.args();
    let mut host = [SENTINEL; 16];
    let st = unsafe { (api().loss)(cfg, &args, &mut host, std::ptr::null_mut()) };
    assert_eq!(st, OK, "{}", last_error());
    assert_eq!(last_error(), "");
    let b = &bufs;
    let offs = [0usize, 4, 4, T];
    let batch = reference::RefBatch {
        rows: (0..B).map(|i| offs[i]..offs[i + 1]).collect(),
        logp: b.logp.to_vec(),
        mask: b.mask.to_vec(),
        old: Some(b.old.to_vec()),
        refl: Some(b.refl.to_vec()),
        ent: Some(b.ent.to_vec()),
        adv: b.adv.to_vec(),
        w: b.w.to_vec(),
        c: b.c.to_vec(),
        is_expert: vec![false; B],
        expert: Some(reference::RefExpert {
            rows: vec![0..3, 3..7],
            logp: b.elogp.to_vec(),
            mask: vec![1.0; 7],
            index: vec![0, -1, 1],
        }),
        norm: Some((20.0, 6.0)),
        sg_logp: None,
        tw: None,
    };
    let want = reference::ref_loss(&common::config(JSON), &batch);
    common::assert_vec_close("metrics", &host, &want.m.to_array(), 1e-6, 1e-7);
    common::assert_vec_close("metrics tensor", &b.metrics.to_vec(), &host, 0.0, 0.0);
    common::assert_vec_close("grad", &b.grad.to_vec(), &want.grad_l, 1e-5, 1e-7);
    common::assert_vec_close("grad_entropy", &b.gradh.to_vec(), &want.grad_h, 1e-12, 0.0);
    unsafe { (api().config_free)(cfg) };
}

#[test]
fn loss_bad_input_of_every_kind() {
    type Mutation = Box<dyn FnOnce(&mut LossBufs, &mut LossArgs)>;
    let mut cases: Vec<(&str, i32, &str, Mutation)> = vec![
        (
            "logprobs NULL",
            NULL_ARGUMENT,
            "logprobs",
            Box::new(|_, a| a.logprobs = std::ptr::null()),
        ),
        (
            "advantages NULL",
            NULL_ARGUMENT,
            "advantages",
            Box::new(|_, a| a.advantages = std::ptr::null()),
        ),
        (
            "weights NULL",
            NULL_ARGUMENT,
            "weights",
            Box::new(|_, a| a.weights = std::ptr::null()),
        ),
        (
            "signs NULL",
            NULL_ARGUMENT,
            "signs",
            Box::new(|_, a| a.signs = std::ptr::null()),
        ),
        (
            "seq_offsets NULL (packed)",
            NULL_ARGUMENT,
            "seq_offsets",
            Box::new(|_, a| a.seq_offsets = std::ptr::null()),
        ),
        (
            "entropy NULL with entropy_coef",
            NULL_ARGUMENT,
            "entropy",
            Box::new(|_, a| a.entropy = std::ptr::null()),
        ),
        (
            "ref NULL with kl_coef",
            NULL_ARGUMENT,
            "ref_logprobs",
            Box::new(|_, a| a.ref_logprobs = std::ptr::null()),
        ),
        (
            "expert_index NULL",
            NULL_ARGUMENT,
            "expert_index",
            Box::new(|_, a| a.expert_index = std::ptr::null()),
        ),
        (
            "logprobs data NULL",
            NULL_ARGUMENT,
            "logprobs",
            Box::new(|b, _| b.logp.desc.data = std::ptr::null_mut()),
        ),
        (
            "logprobs int32",
            DTYPE_MISMATCH,
            "logprobs",
            Box::new(|b, _| b.logp.desc.dtype = Dt::I32.dl()),
        ),
        (
            "logprobs complex",
            DTYPE_MISMATCH,
            "logprobs",
            Box::new(|b, _| b.logp.desc.dtype.code = 5),
        ),
        (
            "old_logprobs 2 lanes",
            DTYPE_MISMATCH,
            "old_logprobs",
            Box::new(|b, _| b.old.desc.dtype.lanes = 2),
        ),
        (
            "weights int64",
            DTYPE_MISMATCH,
            "weights",
            Box::new(|b, _| b.w.desc.dtype = Dt::I64.dl()),
        ),
        (
            "seq_offsets float",
            DTYPE_MISMATCH,
            "seq_offsets",
            Box::new(|b, _| b.offsets.desc.dtype = Dt::F64.dl()),
        ),
        (
            "grad output int32",
            DTYPE_MISMATCH,
            "grad_logprobs",
            Box::new(|b, _| b.grad.desc.dtype = Dt::I32.dl()),
        ),
        (
            "old_logprobs shape",
            SHAPE_MISMATCH,
            "old_logprobs",
            Box::new(|b, _| unsafe { *b.old.desc.shape = (T - 1) as i64 }),
        ),
        (
            "mask shape",
            SHAPE_MISMATCH,
            "mask",
            Box::new(|b, _| unsafe { *b.mask.desc.shape = (T - 2) as i64 }),
        ),
        (
            "advantages length B-1",
            SHAPE_MISMATCH,
            "advantages",
            Box::new(|b, _| unsafe { *b.adv.desc.shape = (B - 1) as i64 }),
        ),
        (
            "signs 2-D",
            SHAPE_MISMATCH,
            "signs",
            Box::new(|b, _| b.c.set_shape(&[B, 1])),
        ),
        (
            "expert_index length",
            SHAPE_MISMATCH,
            "expert_index",
            Box::new(|b, _| unsafe { *b.eidx.desc.shape = 2 }),
        ),
        (
            "grad shape",
            SHAPE_MISMATCH,
            "grad_logprobs",
            Box::new(|b, _| unsafe { *b.grad.desc.shape = 4 }),
        ),
        (
            "metrics length",
            SHAPE_MISMATCH,
            "metrics",
            Box::new(|b, _| unsafe { *b.metrics.desc.shape = 14 }),
        ),
        (
            "logprobs 3-D",
            SHAPE_MISMATCH,
            "logprobs",
            Box::new(|b, _| {
                let t = b.logp.n;
                b.logp.set_shape(&[t, 1, 1])
            }),
        ),
        (
            "offsets decreasing",
            INVALID_ARGUMENT,
            "seq_offsets",
            Box::new(|b, _| b.offsets.set(2, 2.0)),
        ),
        (
            "offsets not ending at T",
            INVALID_ARGUMENT,
            "seq_offsets",
            Box::new(|b, _| b.offsets.set(3, (T - 1) as f64)),
        ),
        (
            "offsets past T",
            INVALID_ARGUMENT,
            "seq_offsets",
            Box::new(|b, _| b.offsets.set(3, (T + 5) as f64)),
        ),
        (
            "offsets not starting at 0",
            INVALID_ARGUMENT,
            "seq_offsets",
            Box::new(|b, _| b.offsets.set(0, 1.0)),
        ),
        (
            "expert offsets decreasing",
            INVALID_ARGUMENT,
            "expert_offsets",
            Box::new(|b, _| b.eoff.set(1, 8.0)),
        ),
        (
            "expert_index = P",
            INVALID_ARGUMENT,
            "expert_index",
            Box::new(|b, _| b.eidx.set(2, 2.0)),
        ),
        (
            "expert_index < -1",
            INVALID_ARGUMENT,
            "expert_index",
            Box::new(|b, _| b.eidx.set(0, -2.0)),
        ),
        (
            "signs 0.5",
            INVALID_ARGUMENT,
            "signs",
            Box::new(|b, _| b.c.set(1, 0.5)),
        ),
        (
            "signs 0",
            INVALID_ARGUMENT,
            "signs",
            Box::new(|b, _| b.c.set(0, 0.0)),
        ),
        (
            "normalizers negative",
            INVALID_ARGUMENT,
            "normalizers.token_count",
            Box::new(|b, _| b.norm.token_count = -1.0),
        ),
        (
            "normalizers NaN",
            INVALID_ARGUMENT,
            "normalizers.seq_count",
            Box::new(|b, _| b.norm.seq_count = f64::NAN),
        ),
        (
            "normalizers all_token_count below token_count",
            INVALID_ARGUMENT,
            "normalizers.all_token_count",
            Box::new(|b, _| b.norm.all_token_count = 19.0),
        ),
        (
            "normalizers all_seq_count below seq_count",
            INVALID_ARGUMENT,
            "normalizers.all_seq_count",
            Box::new(|b, _| b.norm.all_seq_count = 5.0),
        ),
        (
            "normalizers all_token_count infinite",
            INVALID_ARGUMENT,
            "normalizers.all_token_count",
            Box::new(|b, _| b.norm.all_token_count = f64::INFINITY),
        ),
        (
            "mixed devices",
            DEVICE_MISMATCH,
            "old_logprobs",
            Box::new(|b, _| b.old.desc.device.device_type = 2),
        ),
        (
            "mixed devices (output)",
            DEVICE_MISMATCH,
            "grad_logprobs",
            Box::new(|b, _| b.grad.desc.device.device_type = 2),
        ),
        (
            "unknown device type",
            DEVICE_MISMATCH,
            "logprobs",
            Box::new(|b, _| b.logp.desc.device.device_type = 4),
        ),
    ];
    // A NaN or infinity at a counted position of a float input: named, nothing written.
    // (what, the argument named, which tensor, the element, the value put there)
    type Field = fn(&mut LossBufs) -> &mut Tensor;
    let non_finite: [(&str, &str, Field, usize, f64); 8] = [
        ("NaN logprobs", "logprobs", |b| &mut b.logp, 5, f64::NAN),
        (
            "inf logprobs",
            "logprobs",
            |b| &mut b.logp,
            1,
            f64::INFINITY,
        ),
        (
            "NaN old_logprobs",
            "old_logprobs",
            |b| &mut b.old,
            0,
            f64::NAN,
        ),
        (
            "NaN ref_logprobs",
            "ref_logprobs",
            |b| &mut b.refl,
            3,
            f64::NAN,
        ),
        ("NaN entropy", "entropy", |b| &mut b.ent, 3, f64::NAN),
        ("NaN advantages", "advantages", |b| &mut b.adv, 2, f64::NAN),
        ("NaN weights", "weights", |b| &mut b.w, 0, f64::NAN),
        (
            "NaN expert_logprobs",
            "expert_logprobs",
            |b| &mut b.elogp,
            4,
            f64::NAN,
        ),
    ];
    for (what, name, tensor, k, value) in non_finite {
        cases.push((
            what,
            NON_FINITE,
            name,
            Box::new(move |b, _| tensor(b).set(k, value)),
        ));
    }
    // Every tensor on CUDA (device_type 2) on a machine without CUDA.
    if no_cuda_driver() {
        cases.push((
            "CUDA tensors without CUDA",
            CUDA_UNAVAILABLE,
            "",
            Box::new(|b, _| {
                for t in [
                    &mut b.logp,
                    &mut b.offsets,
                    &mut b.mask,
                    &mut b.old,
                    &mut b.refl,
                    &mut b.ent,
                    &mut b.adv,
                    &mut b.w,
                    &mut b.c,
                    &mut b.elogp,
                    &mut b.eoff,
                    &mut b.eidx,
                    &mut b.grad,
                    &mut b.gradh,
                    &mut b.metrics,
                ] {
                    t.desc.device.device_type = 2;
                }
            }),
        ));
    }
    for (what, status, name, mutate) in cases {
        let (st, untouched) = bad_loss(JSON, mutate);
        if status == CUDA_UNAVAILABLE {
            assert_eq!(st, status, "{what}: {}", last_error());
            assert!(!last_error().is_empty());
        } else {
            expect_error(st, status, name, what);
        }
        assert!(untouched, "{what}: outputs were written");
    }
    // NULL cfg / args.
    let mut bufs = LossBufs::new();
    let args = bufs.args();
    let st = unsafe {
        (api().loss)(
            std::ptr::null_mut(),
            &args,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    };
    expect_error(st, NULL_ARGUMENT, "cfg", "cfg NULL");
    let cfg = new_cfg(JSON).unwrap();
    let st = unsafe {
        (api().loss)(
            cfg,
            std::ptr::null(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    };
    expect_error(st, NULL_ARGUMENT, "args", "args NULL");
    assert!(bufs.untouched());
    unsafe { (api().config_free)(cfg) };
}

// ---------------------------------------------------------------------------------------------
// Advantages
// ---------------------------------------------------------------------------------------------

#[test]
fn advantages_bad_input() {
    let cfg = new_cfg("{}").unwrap();
    type Mutation = Box<dyn FnOnce(&mut [Tensor; 4], &mut AdvArgs)>;
    let cases: Vec<(&str, i32, &str, Mutation)> = vec![
        (
            "rewards NULL",
            NULL_ARGUMENT,
            "rewards",
            Box::new(|_, a| a.rewards = std::ptr::null()),
        ),
        (
            "group_ids NULL",
            NULL_ARGUMENT,
            "group_ids",
            Box::new(|_, a| a.group_ids = std::ptr::null()),
        ),
        (
            "advantages NULL",
            NULL_ARGUMENT,
            "advantages",
            Box::new(|_, a| a.advantages = std::ptr::null_mut()),
        ),
        (
            "signs NULL",
            NULL_ARGUMENT,
            "signs",
            Box::new(|_, a| a.signs = std::ptr::null_mut()),
        ),
        (
            "NaN reward",
            NON_FINITE,
            "rewards",
            Box::new(|t, _| t[0].set(2, f64::NAN)),
        ),
        (
            "group id out of range",
            INVALID_ARGUMENT,
            "group_ids",
            Box::new(|t, _| t[1].set(0, 2.0)),
        ),
        (
            "negative group id",
            INVALID_ARGUMENT,
            "group_ids",
            Box::new(|t, _| t[1].set(0, -1.0)),
        ),
        (
            "num_groups negative",
            INVALID_ARGUMENT,
            "num_groups",
            Box::new(|_, a| a.num_groups = -1),
        ),
        (
            "group_ids length",
            SHAPE_MISMATCH,
            "group_ids",
            Box::new(|t, _| unsafe { *t[1].desc.shape = 3 }),
        ),
        (
            "group_ids float",
            DTYPE_MISMATCH,
            "group_ids",
            Box::new(|t, _| t[1].desc.dtype = Dt::F64.dl()),
        ),
        (
            "weights output length",
            SHAPE_MISMATCH,
            "weights",
            Box::new(|t, _| unsafe { *t[2].desc.shape = 5 }),
        ),
        (
            "rewards on CUDA, rest CPU",
            DEVICE_MISMATCH,
            "",
            Box::new(|t, _| t[0].desc.device.device_type = 2),
        ),
    ];
    for (what, status, name, mutate) in cases {
        let mut t = [
            Tensor::new(&[0.0, 1.0, 1.0, 0.5], &[4], Dt::F64),
            Tensor::ints(&[0, 0, 1, 1], &[4], Dt::I64),
            Tensor::filled(SENTINEL, &[4], Dt::F32),
            Tensor::filled(SENTINEL, &[4], Dt::F32),
        ];
        let mut signs = Tensor::filled(SENTINEL, &[4], Dt::F32);
        let mut args = AdvArgs {
            rewards: t[0].ptr(),
            group_ids: t[1].ptr(),
            num_groups: 2,
            correct: std::ptr::null(),
            is_expert: std::ptr::null(),
            advantages: t[3].mptr(),
            weights: t[2].mptr(),
            signs: signs.mptr(),
        };
        mutate(&mut t, &mut args);
        let st = unsafe { (api().group_advantages)(cfg, &args, std::ptr::null_mut()) };
        if name.is_empty() {
            assert_eq!(st, status, "{what}: {}", last_error());
        } else {
            expect_error(st, status, name, what);
        }
        assert!(
            untouched(&t[2]) && untouched(&t[3]) && untouched(&signs),
            "{what}: outputs written"
        );
    }
    // All on CUDA → CUDA unavailable on this machine.
    if !no_cuda_driver() {
        unsafe { (api().config_free)(cfg) };
        return;
    }
    let mut r = Tensor::new(&[0.0, 1.0], &[2], Dt::F32);
    let mut g = Tensor::ints(&[0, 0], &[2], Dt::I32);
    let mut outs = [
        Tensor::filled(SENTINEL, &[2], Dt::F32),
        Tensor::filled(SENTINEL, &[2], Dt::F32),
        Tensor::filled(SENTINEL, &[2], Dt::F32),
    ];
    r.desc.device.device_type = 2;
    g.desc.device.device_type = 2;
    outs.iter_mut().for_each(|o| o.desc.device.device_type = 2);
    let [o0, o1, o2] = &mut outs;
    let args = AdvArgs {
        rewards: r.ptr(),
        group_ids: g.ptr(),
        num_groups: 1,
        correct: std::ptr::null(),
        is_expert: std::ptr::null(),
        advantages: o0.mptr(),
        weights: o1.mptr(),
        signs: o2.mptr(),
    };
    let st = unsafe { (api().group_advantages)(cfg, &args, std::ptr::null_mut()) };
    assert_eq!(st, CUDA_UNAVAILABLE, "{}", last_error());
    unsafe { (api().config_free)(cfg) };
}

// ---------------------------------------------------------------------------------------------
// Logits path
// ---------------------------------------------------------------------------------------------

#[test]
fn logits_bad_input() {
    let (n, v) = (3usize, 6usize);
    let z: Vec<f64> = (0..n * v).map(|i| (i as f64 * 0.37).sin()).collect();
    type Mutation = Box<dyn FnOnce(&mut Tensor, &mut Tensor, &mut f64)>;
    let cases: Vec<(&str, i32, &str, Mutation)> = vec![
        (
            "NaN logit",
            NON_FINITE,
            "logits",
            Box::new(|z, _, _| z.set(7, f64::NAN)),
        ),
        (
            "+inf logit",
            NON_FINITE,
            "logits",
            Box::new(|z, _, _| z.set(2, f64::INFINITY)),
        ),
        (
            "label >= V",
            INVALID_ARGUMENT,
            "labels",
            Box::new(|_, l, _| l.set(1, 6.0)),
        ),
        (
            "labels length",
            SHAPE_MISMATCH,
            "labels",
            Box::new(|_, l, _| unsafe { *l.desc.shape = 2 }),
        ),
        (
            "labels float",
            DTYPE_MISMATCH,
            "labels",
            Box::new(|_, l, _| l.desc.dtype = Dt::F32.dl()),
        ),
        (
            "logits f64",
            DTYPE_MISMATCH,
            "logits",
            Box::new(|z, _, _| z.desc.dtype = Dt::F64.dl()),
        ),
        (
            "logits 1-D",
            SHAPE_MISMATCH,
            "logits",
            Box::new(|z, _, _| z.desc.ndim = 1),
        ),
        (
            "temperature 0",
            INVALID_ARGUMENT,
            "temperature",
            Box::new(|_, _, t| *t = 0.0),
        ),
        (
            "temperature NaN",
            INVALID_ARGUMENT,
            "temperature",
            Box::new(|_, _, t| *t = f64::NAN),
        ),
        (
            "mixed devices",
            DEVICE_MISMATCH,
            "",
            Box::new(|_, l, _| l.desc.device.device_type = 2),
        ),
        (
            "logits data NULL",
            NULL_ARGUMENT,
            "logits",
            Box::new(|z, _, _| z.desc.data = std::ptr::null_mut()),
        ),
    ];
    for (what, status, name, mutate) in cases {
        let mut zt = Tensor::new(&z, &[n, v], Dt::F32);
        let mut lt = Tensor::ints(&[0, 5, 2], &[n], Dt::I64);
        let mut temp = 1.0;
        mutate(&mut zt, &mut lt, &mut temp);
        let mut lp = Tensor::filled(SENTINEL, &[n], Dt::F32);
        let mut en = Tensor::filled(SENTINEL, &[n], Dt::F32);
        let mut ls = Tensor::filled(SENTINEL, &[n], Dt::F32);
        let st = unsafe {
            (api().logits_forward)(
                zt.ptr(),
                lt.ptr(),
                temp,
                lp.mptr(),
                en.mptr(),
                ls.mptr(),
                std::ptr::null_mut(),
            )
        };
        if name.is_empty() {
            assert_eq!(st, status, "{what}: {}", last_error());
        } else {
            expect_error(st, status, name, what);
        }
        assert!(
            untouched(&lp) && untouched(&en) && untouched(&ls),
            "forward {what}: outputs written"
        );
        // A label past this tensor's vocabulary is legal for the backward and the shard
        // statistics: they also run on vocabulary shards, where it belongs to another shard.
        if what == "label >= V" {
            continue;
        }
        // The same spoiled input in an in-place backward leaves the logits untouched.
        {
            let before = zt.bytes().to_vec();
            let lse = Tensor::new(&[1.0; 3], &[n], Dt::F32);
            let ent = Tensor::new(&[1.0; 3], &[n], Dt::F32);
            let g = Tensor::new(&[0.5; 3], &[n], Dt::F32);
            let zp = zt.mptr();
            let st = unsafe {
                (api().logits_backward)(
                    zp,
                    lt.ptr(),
                    temp,
                    0,
                    lse.ptr(),
                    ent.ptr(),
                    g.ptr(),
                    g.ptr(),
                    zp,
                    std::ptr::null_mut(),
                )
            };
            assert_ne!(st, OK, "backward {what}");
            assert_eq!(zt.bytes(), &before[..], "backward {what}: logits modified");
        }
        // And the shard statistics.
        let mut stats = Tensor::filled(SENTINEL, &[n, 4], Dt::F32);
        let st = unsafe {
            (api().shard_stats)(
                zt.ptr(),
                lt.ptr(),
                temp,
                0,
                stats.mptr(),
                std::ptr::null_mut(),
            )
        };
        assert_ne!(st, OK, "shard_stats {what}");
        assert!(untouched(&stats), "shard_stats {what}: written");
    }
    // Backward-specific: NaN in grad_logprobs; grad_entropy without entropy; wrong grad shape.
    let mut zt = Tensor::new(&z, &[n, v], Dt::F32);
    let lt = Tensor::ints(&[0, 5, -1], &[n], Dt::I64);
    let lse = Tensor::new(&[1.0; 3], &[n], Dt::F32);
    let g_nan = Tensor::new(&[0.5, f64::NAN, 0.1], &[n], Dt::F32);
    let g = Tensor::new(&[0.5; 3], &[n], Dt::F32);
    let mut out = Tensor::filled(SENTINEL, &[n, v], Dt::F32);
    let mut small = Tensor::filled(SENTINEL, &[n, v - 1], Dt::F32);
    // (what, grad_logprobs, grad_entropy, grad_logits of the wrong shape, status, named argument)
    let backward_cases = [
        (
            "backward NaN grad",
            &g_nan,
            None,
            false,
            NON_FINITE,
            "grad_logprobs",
        ),
        (
            "backward grad_entropy without entropy",
            &g,
            Some(&g),
            false,
            NULL_ARGUMENT,
            "entropy",
        ),
        (
            "backward grad shape",
            &g,
            None,
            true,
            SHAPE_MISMATCH,
            "grad_logits",
        ),
    ];
    for (what, grad_logprobs, grad_entropy, wrong_shape, status, name) in backward_cases {
        let grad_logits = if wrong_shape { &mut small } else { &mut out };
        let st = unsafe {
            (api().logits_backward)(
                zt.ptr(),
                lt.ptr(),
                1.0,
                0,
                lse.ptr(),
                std::ptr::null(),
                grad_logprobs.ptr(),
                grad_entropy.map_or(std::ptr::null(), |t| t.ptr()),
                grad_logits.mptr(),
                std::ptr::null_mut(),
            )
        };
        expect_error(st, status, name, what);
    }
    assert!(untouched(&out) && untouched(&small));
    // Full-vocabulary forward refuses a shard offset; finish refuses a bad stats shape.
    let mut st_t = Tensor::filled(SENTINEL, &[2, n, 3], Dt::F32);
    let mut lp = Tensor::filled(SENTINEL, &[n], Dt::F32);
    let mut ls = Tensor::filled(SENTINEL, &[n], Dt::F32);
    let st = unsafe {
        (api().shard_finish)(
            st_t.mptr(),
            lt.ptr(),
            lp.mptr(),
            std::ptr::null_mut(),
            ls.mptr(),
            std::ptr::null_mut(),
        )
    };
    expect_error(st, SHAPE_MISMATCH, "stats", "finish stats [R,N,3]");
    assert!(untouched(&lp) && untouched(&ls));
    // CUDA logits on a machine without CUDA.
    if !no_cuda_driver() {
        return;
    }
    zt.desc.device.device_type = 2;
    let mut lt2 = Tensor::ints(&[0, 5, -1], &[n], Dt::I64);
    lt2.desc.device.device_type = 2;
    let mut outs = [
        Tensor::filled(SENTINEL, &[n], Dt::F32),
        Tensor::filled(SENTINEL, &[n], Dt::F32),
    ];
    outs.iter_mut().for_each(|o| o.desc.device.device_type = 2);
    let [a, b] = &mut outs;
    let st = unsafe {
        (api().logits_forward)(
            zt.ptr(),
            lt2.ptr(),
            1.0,
            a.mptr(),
            std::ptr::null_mut(),
            b.mptr(),
            std::ptr::null_mut(),
        )
    };
    assert_eq!(st, CUDA_UNAVAILABLE, "{}", last_error());
}
