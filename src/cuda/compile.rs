//! Kernel sources and their NVRTC compilation.
//!
//! Every `cuda/*.cu` file is embedded in the library (`include_str!`) and compiled to PTX with
//! NVRTC at first use, for the device's compute capability; the driver then JIT-compiles the PTX
//! (its compute cache keeps the result across processes). The sources include no header, so a
//! bare NVRTC (the `nvidia-cuda-nvrtc` wheel, or the toolkit's `libnvrtc.so.13`) is enough;
//! `nvrtc_lib` finds it.

use crate::error::{Error, Result};
use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys};
use std::ffi::CString;
use std::sync::OnceLock;

/// One kernel source file (an op family) and the kernels it must define.
#[derive(Debug)]
pub struct KernelSource {
    /// Module name, also the file stem under `cuda/`.
    pub name: &'static str,
    pub source: &'static str,
    pub kernels: &'static [&'static str],
}

// The sources moved to their families' modules (`cuda::logits::LOGITS`, `cuda::loss::LOSS`)
// and the registry to `cuda::SOURCES`; these aliases keep the old paths for one release.
#[deprecated(note = "moved to calibrl::cuda::logits::LOGITS")]
pub const LOGITS: KernelSource = super::logits::LOGITS;
#[deprecated(note = "moved to calibrl::cuda::SOURCES")]
pub const SOURCES: &[&KernelSource] = super::SOURCES;
#[deprecated(note = "moved to calibrl::cuda::compile_all")]
pub fn compile_all(arch: i32) -> Result<Compiled> {
    compile_sources(super::SOURCES, arch)
}

/// Whether NVRTC can be loaded (checked once; cudarc would panic on a missing library).
pub fn nvrtc_available() -> bool {
    nvrtc_library().is_ok()
}

/// Which NVRTC is used (a path, or how it was found), or what was searched when none was.
pub fn nvrtc_library() -> std::result::Result<&'static str, &'static str> {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    let found = super::nvrtc_lib::locate()?;
    // SAFETY: only probes whether the shared library can be opened (now by its SONAME, which
    // resolves to the library `locate` opened).
    if *PRESENT.get_or_init(|| unsafe { nvrtc_sys::is_culib_present() }) {
        Ok(found)
    } else {
        Err("NVRTC was opened but cudarc cannot load it by its SONAME")
    }
}

pub(crate) fn require_nvrtc() -> Result<()> {
    nvrtc_library().map(|_| ()).map_err(|searched| {
        Error::cuda_unavailable(format!("CUDA tensors were passed but {searched}"))
    })
}

/// The NVRTC version as (major, minor).
pub fn nvrtc_version() -> Result<(i32, i32)> {
    require_nvrtc()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC is loaded; the pointers are valid.
    unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| Error::cuda(format!("nvrtcVersion failed: {e:?}")))?;
    Ok((major, minor))
}

/// The virtual architectures (e.g. 90 for compute_90) this NVRTC can target, ascending.
pub fn supported_archs() -> Result<Vec<i32>> {
    require_nvrtc()?;
    let mut n = 0;
    // SAFETY: NVRTC is loaded; the buffer holds `n` entries.
    unsafe {
        nvrtc_sys::nvrtcGetNumSupportedArchs(&mut n)
            .result()
            .map_err(|e| Error::cuda(format!("nvrtcGetNumSupportedArchs failed: {e:?}")))?;
        let mut archs = vec![0; n.max(0) as usize];
        nvrtc_sys::nvrtcGetSupportedArchs(archs.as_mut_ptr())
            .result()
            .map_err(|e| Error::cuda(format!("nvrtcGetSupportedArchs failed: {e:?}")))?;
        archs.sort_unstable();
        Ok(archs)
    }
}

/// The architecture to compile for on a device of compute capability `major.minor`: the device's
/// own, or the newest one NVRTC knows below it (PTX runs on newer devices).
pub fn arch_for_device(major: i32, minor: i32) -> Result<i32> {
    let want = major * 10 + minor;
    let archs = supported_archs()?;
    archs.iter().rev().copied().find(|&a| a <= want).ok_or_else(|| {
        Error::cuda(format!(
            "NVRTC supports architectures {archs:?}, none of which runs on a device of compute capability \
             {major}.{minor}"
        ))
    })
}

/// NVRTC options for architecture `arch` (e.g. 90).
pub fn options(arch: i32) -> Vec<String> {
    vec![
        format!("--gpu-architecture=compute_{arch}"),
        "--std=c++17".into(),
        // Line tables for compute-sanitizer / profilers; no effect on the generated code.
        "-lineinfo".into(),
    ]
}

/// The source NVRTC compiles: the embedded one, or `$CALIBRL_KERNEL_DIR/<name>.cu` when that
/// variable is set (kernel development: try a variant on a GPU machine without rebuilding).
fn kernel_source(src: &KernelSource) -> Result<String> {
    match std::env::var_os("CALIBRL_KERNEL_DIR") {
        None => Ok(src.source.to_string()),
        Some(dir) => {
            let path = std::path::Path::new(&dir).join(format!("{}.cu", src.name));
            std::fs::read_to_string(&path).map_err(|e| {
                Error::cuda(format!(
                    "CALIBRL_KERNEL_DIR is set but {} cannot be read: {e}",
                    path.display()
                ))
            })
        }
    }
}

/// Compiles `src` to PTX for `compute_{arch}`. The error carries NVRTC's log.
pub fn compile_ptx(src: &KernelSource, arch: i32) -> Result<CString> {
    require_nvrtc()?;
    let code = CString::new(kernel_source(src)?)
        .map_err(|_| Error::cuda(format!("{}.cu contains a NUL byte", src.name)))?;
    let name = CString::new(format!("{}.cu", src.name)).expect("module names have no NUL");
    let prog = nvrtc::create_program(&code, Some(&name))
        .map_err(|e| Error::cuda(format!("nvrtcCreateProgram({}.cu) failed: {e:?}", src.name)))?;
    // SAFETY: `prog` is a live program until destroyed below; `code`/`name` outlive it.
    let result = unsafe {
        let compiled = nvrtc::compile_program(prog, &options(arch));
        let log = program_log(prog);
        let ptx = compiled.and_then(|()| nvrtc::get_ptx(prog));
        let _ = nvrtc::destroy_program(prog);
        ptx.map_err(|e| {
            Error::cuda(format!(
                "NVRTC failed to compile {}.cu for compute_{arch} ({e:?}):\n{log}",
                src.name
            ))
        })
    }?;
    let bytes: Vec<u8> = result
        .iter()
        .map(|&c| c as u8)
        .take_while(|&b| b != 0)
        .collect();
    let ptx = CString::new(bytes).expect("NUL was stripped");
    for kernel in src.kernels {
        if !ptx
            .to_bytes()
            .windows(kernel.len() + 1)
            .any(|w| w[..kernel.len()] == *kernel.as_bytes() && w[kernel.len()] == b'(')
        {
            return Err(Error::cuda(format!(
                "{}.cu compiled but defines no kernel `{kernel}`",
                src.name
            )));
        }
    }
    Ok(ptx)
}

unsafe fn program_log(prog: nvrtc_sys::nvrtcProgram) -> String {
    match nvrtc::get_program_log(prog) {
        Ok(log) => {
            let bytes: Vec<u8> = log
                .iter()
                .map(|&c| c as u8)
                .take_while(|&b| b != 0)
                .collect();
            String::from_utf8_lossy(&bytes).trim().to_string()
        }
        Err(e) => format!("(no log: {e:?})"),
    }
}

/// One kernel's entry in a compile report.
#[derive(Clone, Debug)]
pub struct KernelReport {
    pub module: &'static str,
    pub kernel: String,
    /// Bytes of PTX text from the kernel's `.entry` to the next entry (or the end).
    pub ptx_bytes: usize,
}

/// The result of [`compile_sources`].
#[derive(Clone, Debug)]
pub struct Compiled {
    pub reports: Vec<KernelReport>,
    /// (module name, PTX text)
    pub modules: Vec<(&'static str, String)>,
}

/// Compiles the given kernel sources for `compute_{arch}` and reports each kernel's PTX size.
/// Also returns the full PTX of each module, for offline tools (`ptxas -v`).
pub fn compile_sources(sources: &[&KernelSource], arch: i32) -> Result<Compiled> {
    let mut reports = Vec::new();
    let mut modules = Vec::new();
    for src in sources {
        let ptx = compile_ptx(src, arch)?
            .into_string()
            .map_err(|_| Error::cuda("PTX is not UTF-8"))?;
        reports.extend(
            ptx_entries(&ptx)
                .into_iter()
                .map(|(kernel, ptx_bytes)| KernelReport {
                    module: src.name,
                    kernel,
                    ptx_bytes,
                }),
        );
        modules.push((src.name, ptx));
    }
    Ok(Compiled { reports, modules })
}

/// (entry name, byte length) of every `.entry` in a PTX text.
fn ptx_entries(ptx: &str) -> Vec<(String, usize)> {
    let starts: Vec<usize> = ptx.match_indices(".entry ").map(|(i, _)| i).collect();
    starts
        .iter()
        .enumerate()
        .map(|(j, &start)| {
            let end = starts.get(j + 1).copied().unwrap_or(ptx.len());
            let name = ptx[start + ".entry ".len()..]
                .split(|c: char| c == '(' || c.is_whitespace())
                .next()
                .unwrap_or("")
                .to_string();
            (name, end - start)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptx_entries_splits_at_each_entry() {
        let ptx = ".version 9.0\n.visible .entry a(\n.param .u64 x\n)\n{ ret; }\n.visible .entry bb(\n)\n{ ret; }\n";
        let e = ptx_entries(ptx);
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].0, "a");
        assert_eq!(e[1].0, "bb");
        assert_eq!(e[0].1 + e[1].1 + ptx.find(".entry a").unwrap(), ptx.len());
    }
}
