//! Kernel sources and their NVRTC compilation.
//!
//! Every `cuda/*.cu` file is embedded in the library (`include_str!`) and compiled with NVRTC at
//! first use for the device's compute capability: to PTX, which the driver JIT-compiles (its
//! compute cache keeps the result across processes), or, where the NVRTC is newer than the
//! driver within the same CUDA major, straight to a cubin for the device's architecture
//! (`nvrtc_lib` explains the rules and picks NVRTC 13 or 12). The sources include no system
//! header, only the project's own (`HEADERS`, handed to NVRTC by name), so a bare NVRTC (the
//! `nvidia-cuda-nvrtc` wheel, or the toolkit's `libnvrtc.so.13`/`.12`) is enough.

use super::nvrtc_lib::{self, Nvrtc, Output};
use crate::error::{Error, Result};
use std::ffi::CString;

/// One kernel source file (an op family) and the kernels it must define.
#[derive(Debug)]
pub struct KernelSource {
    /// Module name, also the file stem under `cuda/`.
    pub name: &'static str,
    pub source: &'static str,
    pub kernels: &'static [&'static str],
}

/// Whether an NVRTC this driver can run was found (checked once).
pub fn nvrtc_available() -> bool {
    nvrtc_lib::nvrtc().is_ok()
}

/// Which NVRTC is used (its path, or how it was found), or what was searched when none fits.
pub fn nvrtc_library() -> std::result::Result<&'static str, &'static str> {
    nvrtc_lib::nvrtc().map(|n| n.place.as_str())
}

pub(crate) fn nvrtc() -> Result<&'static Nvrtc> {
    nvrtc_lib::nvrtc()
        .map_err(|why| Error::cuda_unavailable(format!("CUDA tensors were passed but {why}")))
}

pub(crate) fn require_nvrtc() -> Result<()> {
    nvrtc().map(|_| ())
}

/// The NVRTC version as (major, minor).
pub fn nvrtc_version() -> Result<(i32, i32)> {
    let (major, minor) = nvrtc()?.version;
    Ok((major as i32, minor as i32))
}

/// What the kernels are compiled to with this NVRTC and driver (PTX, or a cubin where the NVRTC
/// is newer than the driver).
pub fn output() -> Result<Output> {
    Ok(nvrtc()?.output)
}

/// The virtual architectures (e.g. 90 for compute_90) this NVRTC can target, ascending.
pub fn supported_archs() -> Result<Vec<i32>> {
    nvrtc()?.supported_archs().map_err(Error::cuda)
}

/// The architecture to compile for on a device of compute capability `major.minor`.
///
/// PTX: the device's own, or the newest one NVRTC knows below it (PTX runs on newer devices).
/// Cubin: the device's own, or the newest one below it of the same major (a cubin runs on
/// devices of the same major and an equal or higher minor).
pub fn arch_for_device(major: i32, minor: i32) -> Result<i32> {
    arch_for(major, minor, &supported_archs()?, output()?)
}

/// [`arch_for_device`] for a given list of NVRTC architectures and output.
pub fn arch_for(major: i32, minor: i32, archs: &[i32], output: Output) -> Result<i32> {
    let want = major * 10 + minor;
    let fits = |a: i32| a <= want && (output == Output::Ptx || a / 10 == major);
    archs
        .iter()
        .rev()
        .copied()
        .find(|&a| fits(a))
        .ok_or_else(|| {
            let how = match output {
                Output::Ptx => "PTX",
                Output::Cubin => {
                    "a cubin (this NVRTC is newer than the driver, so its PTX cannot be used)"
                }
            };
            Error::cuda(format!(
            "NVRTC supports architectures {archs:?}, none of which gives {how} for a device of \
             compute capability {major}.{minor}"
        ))
        })
}

/// The name of architecture `arch` for `output`: `compute_90` (PTX) or `sm_90` (cubin).
pub fn target_name(arch: i32, output: Output) -> String {
    match output {
        Output::Ptx => format!("compute_{arch}"),
        Output::Cubin => format!("sm_{arch}"),
    }
}

/// NVRTC options for architecture `arch` (e.g. 90) and `output`.
pub fn options(arch: i32, output: Output) -> Vec<String> {
    vec![
        format!("--gpu-architecture={}", target_name(arch, output)),
        "--std=c++17".into(),
        // Line tables for compute-sanitizer / profilers; no effect on the generated code.
        "-lineinfo".into(),
    ]
}

/// The project's headers, `#include "<name>"` in `cuda/*.cu`: (name, embedded source).
const HEADERS: &[(&str, &str)] = &[("dtype.cuh", include_str!("../../cuda/dtype.cuh"))];

/// The headers as NVRTC takes them: embedded, or read from `$CALIBRL_KERNEL_DIR` where that
/// folder has the file (so a variant can change a header too).
fn header_sources() -> Result<Vec<(CString, CString)>> {
    let dir = std::env::var_os("CALIBRL_KERNEL_DIR");
    HEADERS
        .iter()
        .map(|&(name, embedded)| {
            let path = dir.as_ref().map(|d| std::path::Path::new(d).join(name));
            let text = match path.filter(|p| p.exists()) {
                Some(p) => std::fs::read_to_string(&p)
                    .map_err(|e| Error::cuda(format!("{} cannot be read: {e}", p.display())))?,
                None => embedded.to_string(),
            };
            let text = CString::new(text)
                .map_err(|_| Error::cuda(format!("{name} contains a NUL byte")))?;
            Ok((CString::new(name).expect("header names have no NUL"), text))
        })
        .collect()
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

/// Compiles `src` for `arch` to `output`: PTX text with its NUL, or a cubin. The error carries
/// NVRTC's log; the image must define every kernel of `src`.
pub fn compile_module(src: &KernelSource, arch: i32, output: Output) -> Result<Vec<u8>> {
    let nvrtc = nvrtc()?;
    let code = CString::new(kernel_source(src)?)
        .map_err(|_| Error::cuda(format!("{}.cu contains a NUL byte", src.name)))?;
    let name = CString::new(format!("{}.cu", src.name)).expect("module names have no NUL");
    let headers = header_sources()?;
    let header_refs: Vec<(&std::ffi::CStr, &std::ffi::CStr)> = headers
        .iter()
        .map(|(n, t)| (n.as_c_str(), t.as_c_str()))
        .collect();
    let target = target_name(arch, output);
    let image = nvrtc
        .compile(&code, &name, &header_refs, &options(arch, output), output)
        .map_err(|e| {
            Error::cuda(format!(
                "NVRTC {}.{} failed to compile {}.cu for {target} ({}):\n{}",
                nvrtc.version.0, nvrtc.version.1, src.name, e.message, e.log
            ))
        })?;
    if output == Output::Cubin && !image.starts_with(b"\x7fELF") {
        return Err(Error::cuda(format!(
            "{}.cu: NVRTC returned no ELF cubin for {target}",
            src.name
        )));
    }
    for kernel in src.kernels {
        // PTX: `.entry name(`; cubin: the symbol name with its NUL in the string table.
        let end = match output {
            Output::Ptx => b'(',
            Output::Cubin => 0,
        };
        if !image
            .windows(kernel.len() + 1)
            .any(|w| w[..kernel.len()] == *kernel.as_bytes() && w[kernel.len()] == end)
        {
            return Err(Error::cuda(format!(
                "{}.cu compiled but defines no kernel `{kernel}` ({target})",
                src.name
            )));
        }
    }
    Ok(image)
}

/// Compiles `src` to PTX for `compute_{arch}`. The error carries NVRTC's log.
pub fn compile_ptx(src: &KernelSource, arch: i32) -> Result<CString> {
    let mut ptx = compile_module(src, arch, Output::Ptx)?;
    let nul = ptx.iter().position(|&b| b == 0).unwrap_or(ptx.len());
    ptx.truncate(nul);
    Ok(CString::new(ptx).expect("NUL was stripped"))
}

/// Compiles `src` to a cubin for `sm_{arch}` (what the library loads where NVRTC is newer than
/// the driver). The error carries NVRTC's log.
pub fn compile_cubin(src: &KernelSource, arch: i32) -> Result<Vec<u8>> {
    compile_module(src, arch, Output::Cubin)
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
