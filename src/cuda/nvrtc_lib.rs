//! Which NVRTC to use with the installed driver, and its entry points.
//!
//! At first use the driver's CUDA version is read (`cuDriverGetVersion`, see
//! [`culib::driver_version`]), `libnvrtc.so.13` and `libnvrtc.so.12` are looked for where pip,
//! the toolkit and the system put them ([`culib::find`]; the CUDA 13 wheel's `nvidia/cu13/lib`,
//! the CUDA 12 wheel's `nvidia/cuda_nvrtc/lib`), and [`select`] picks one by CUDA's
//! compatibility rules (NVIDIA, "CUDA Compatibility": minor version compatibility and its PTX
//! limitation):
//!
//! - a driver runs code of its own CUDA major or an older one (backward compatibility);
//! - the PTX an NVRTC emits carries that release's PTX ISA version, which the driver's JIT only
//!   accepts when the driver is at least that release (`CUDA_ERROR_UNSUPPORTED_PTX_VERSION`
//!   otherwise), so PTX is used where NVRTC's major.minor ≤ the driver's;
//! - where NVRTC is newer than the driver *within the same major* (NVRTC 12.9 on a 12.4 driver),
//!   the kernels are compiled straight to a cubin for the device's architecture
//!   (`--gpu-architecture=sm_XY`, `nvrtcGetCUBIN`): minor version compatibility covers machine
//!   code built by a newer toolkit of the same major, and no driver JIT is involved. NVRTC cannot
//!   emit an older PTX ISA, so that is the only way for such a pair;
//! - across majors nothing newer runs: NVRTC 13 needs a CUDA 13 driver (≥ 580).
//!
//! The same major as the driver is preferred (13 on a 13.x driver), then an older one.
//! `CALIBRL_NVRTC_MAJOR=12` (or 13) restricts the choice to that major (testing).
//!
//! NVRTC is called through the entry points resolved here, not cudarc's bindings: cudarc 0.17
//! binds every symbol of the CUDA version chosen at build time and panics on a missing one
//! (NVRTC 13 dropped `nvrtcGetNVVM`, which the 12.x bindings require), and loads only that
//! major's SONAME.

use super::culib::{self, Library, LibrarySpec};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

/// NVRTC's file names and wheel directories.
pub const NVRTC: LibrarySpec = LibrarySpec {
    stem: "nvrtc",
    wheel_dirs: &[(13, "nvidia/cu13/lib"), (12, "nvidia/cuda_nvrtc/lib")],
};

/// The NVRTC majors the kernels are checked with, most preferred first.
pub const MAJORS: &[u32] = &[13, 12];

/// Environment variable restricting the NVRTC major (testing: `CALIBRL_NVRTC_MAJOR=12`).
pub const FORCE_MAJOR_ENV: &str = "CALIBRL_NVRTC_MAJOR";

/// What the kernels are compiled to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// PTX for a virtual architecture (`compute_XY`), JIT-compiled by the driver.
    Ptx,
    /// Machine code for the device's architecture (`sm_XY`): no driver JIT.
    Cubin,
}

/// An NVRTC that was found: its version and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub major: u32,
    pub minor: u32,
    pub place: String,
}

/// The NVRTC [`select`] picked (an index into its `found`) and what to compile to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Choice {
    pub index: usize,
    pub output: Output,
}

/// (major, minor) of a `cuDriverGetVersion` value (12040 → (12, 4)).
pub fn decode_driver_version(v: i32) -> (u32, u32) {
    let v = v.max(0) as u32;
    (v / 1000, (v % 1000) / 10)
}

/// The pip extra (and wheel) that brings an NVRTC of CUDA major `major`.
pub fn fix_for(major: u32) -> String {
    match major {
        12 => {
            "`pip install calibrl[cuda12]` (the nvidia-cuda-nvrtc-cu12 wheel) or install a CUDA 12 \
               toolkit"
                .into()
        }
        _ => "`pip install calibrl[cuda13]` (the nvidia-cuda-nvrtc 13 wheel) or install a CUDA 13 \
              toolkit"
            .into(),
    }
}

/// How `found` runs on a driver of CUDA `driver`, or why it cannot.
fn output_on(found: &Found, driver: (u32, u32)) -> Result<Output, String> {
    let (dm, dn) = driver;
    if found.major < dm || (found.major == dm && found.minor <= dn) {
        Ok(Output::Ptx)
    } else if found.major == dm {
        Ok(Output::Cubin)
    } else {
        Err(format!(
            "needs a CUDA {} driver (≥ {})",
            found.major,
            min_driver(found.major)
        ))
    }
}

/// The oldest Linux driver branch of a CUDA major (NVIDIA's minor version compatibility table).
fn min_driver(major: u32) -> u32 {
    match major {
        12 => 525,
        13 => 580,
        _ => 0,
    }
}

/// Picks the NVRTC to use (pure: the selection rules of the module docs).
///
/// - `driver`: the driver's CUDA (major, minor), `None` without a driver (compile-only use:
///   the newest major found is used, for PTX);
/// - `found`: the NVRTCs found, one per major;
/// - `forced`: `CALIBRL_NVRTC_MAJOR`;
/// - `searched`: the places searched without finding one (for the error).
pub fn select(
    driver: Option<(u32, u32)>,
    found: &[Found],
    forced: Option<u32>,
    searched: &[String],
) -> Result<Choice, String> {
    let listing = || {
        let found: Vec<String> = found
            .iter()
            .map(|f| {
                let why = match driver.map(|d| output_on(f, d)) {
                    Some(Err(why)) => format!(": {why}"),
                    _ if forced.is_some_and(|m| m != f.major) => {
                        format!(": not CUDA {}", forced.unwrap_or(0))
                    }
                    _ => String::new(),
                };
                format!("NVRTC {}.{} at {}{why}", f.major, f.minor, f.place)
            })
            .collect();
        let mut parts = Vec::new();
        if !found.is_empty() {
            parts.push(format!("Found: {}.", found.join("; ")));
        }
        if !searched.is_empty() {
            parts.push(format!("Searched: {}.", searched.join(", ")));
        }
        parts.join(" ")
    };
    let driver_text = |(m, n): (u32, u32)| format!("the driver supports CUDA {m}.{n}");
    if let Some((dm, dn)) = driver {
        if dm < 12 {
            return Err(format!(
                "{}; calibrl's CUDA backend needs a driver of CUDA 12.0 or later (≥ 525): update \
                 the NVIDIA driver",
                driver_text((dm, dn))
            ));
        }
    }
    let mut best: Option<Choice> = None;
    for (index, f) in found.iter().enumerate() {
        if forced.is_some_and(|m| m != f.major) {
            continue;
        }
        let output = match driver {
            None => Output::Ptx,
            Some(d) => match output_on(f, d) {
                Ok(o) => o,
                Err(_) => continue,
            },
        };
        if best.map_or(true, |b| found[b.index].major < f.major) {
            best = Some(Choice { index, output });
        }
    }
    if let Some(choice) = best {
        return Ok(choice);
    }
    // Nothing fits: say what was found and searched, and the fix for this driver.
    let want = forced.unwrap_or(match driver {
        Some((dm, _)) => dm.min(13),
        None => 13,
    });
    let mut msg = match (driver, forced) {
        (_, Some(m)) => format!("{FORCE_MAJOR_ENV}={m} but no usable NVRTC {m} was found"),
        (Some(d), None) => format!(
            "no NVRTC that this driver can run was found ({})",
            driver_text(d)
        ),
        (None, None) => "NVRTC (libnvrtc.so.13 or libnvrtc.so.12) was not found".into(),
    };
    if let (Some(d), Some(_)) = (driver, forced) {
        msg.push_str(&format!(" ({})", driver_text(d)));
    }
    let mut fix = fix_for(want);
    if let (Some(m), Some((dm, _))) = (forced, driver) {
        if m > dm {
            fix = format!(
                "unset {FORCE_MAJOR_ENV}, or update the driver to CUDA {m} (≥ {})",
                min_driver(m)
            );
        }
    } else if driver.is_none() && forced.is_none() {
        fix = format!(
            "{fix} (CUDA 13 drivers, ≥ 580), or {} (CUDA 12 drivers, ≥ 525)",
            fix_for(12)
        );
    } else if want == 12 && forced.is_none() {
        fix.push_str(", or update the driver to CUDA 13 (≥ 580) to use NVRTC 13");
    }
    Err(format!("{msg}. Fix: {fix}. {}", listing())
        .trim_end()
        .to_string())
}

/// `CALIBRL_NVRTC_MAJOR`, checked.
pub fn forced_major(value: Option<&str>) -> Result<Option<u32>, String> {
    match value.map(str::trim) {
        None | Some("") => Ok(None),
        Some(v) => v
            .parse::<u32>()
            .ok()
            .filter(|m| MAJORS.contains(m))
            .map(Some)
            .ok_or_else(|| format!("{FORCE_MAJOR_ENV}={v}: must be 12 or 13")),
    }
}

type NvrtcResult = c_int;
type Program = *mut c_void;

/// NVRTC's entry points (only those the library calls; each exists in NVRTC 11.2 to 13.x).
struct Api {
    version: unsafe extern "C" fn(*mut c_int, *mut c_int) -> NvrtcResult,
    num_archs: unsafe extern "C" fn(*mut c_int) -> NvrtcResult,
    archs: unsafe extern "C" fn(*mut c_int) -> NvrtcResult,
    create: unsafe extern "C" fn(
        *mut Program,
        *const c_char,
        *const c_char,
        c_int,
        *const *const c_char,
        *const *const c_char,
    ) -> NvrtcResult,
    compile: unsafe extern "C" fn(Program, c_int, *const *const c_char) -> NvrtcResult,
    destroy: unsafe extern "C" fn(*mut Program) -> NvrtcResult,
    log_size: unsafe extern "C" fn(Program, *mut usize) -> NvrtcResult,
    log: unsafe extern "C" fn(Program, *mut c_char) -> NvrtcResult,
    ptx_size: unsafe extern "C" fn(Program, *mut usize) -> NvrtcResult,
    ptx: unsafe extern "C" fn(Program, *mut c_char) -> NvrtcResult,
    cubin_size: unsafe extern "C" fn(Program, *mut usize) -> NvrtcResult,
    cubin: unsafe extern "C" fn(Program, *mut c_char) -> NvrtcResult,
    error_string: unsafe extern "C" fn(NvrtcResult) -> *const c_char,
}

impl Api {
    fn load(lib: &Library) -> Result<Api, String> {
        fn get<T: Copy>(lib: &Library, name: &str) -> Result<T, String> {
            let p = lib
                .symbol(name)
                .ok_or_else(|| format!("it has no symbol {name}"))?;
            assert_eq!(std::mem::size_of::<T>(), std::mem::size_of_val(&p));
            // SAFETY: `T` is the function pointer type of NVRTC's declaration of `name`.
            Ok(unsafe { std::mem::transmute_copy(&p) })
        }
        Ok(Api {
            version: get(lib, "nvrtcVersion")?,
            num_archs: get(lib, "nvrtcGetNumSupportedArchs")?,
            archs: get(lib, "nvrtcGetSupportedArchs")?,
            create: get(lib, "nvrtcCreateProgram")?,
            compile: get(lib, "nvrtcCompileProgram")?,
            destroy: get(lib, "nvrtcDestroyProgram")?,
            log_size: get(lib, "nvrtcGetProgramLogSize")?,
            log: get(lib, "nvrtcGetProgramLog")?,
            ptx_size: get(lib, "nvrtcGetPTXSize")?,
            ptx: get(lib, "nvrtcGetPTX")?,
            cubin_size: get(lib, "nvrtcGetCUBINSize")?,
            cubin: get(lib, "nvrtcGetCUBIN")?,
            error_string: get(lib, "nvrtcGetErrorString")?,
        })
    }

    /// `call`'s result as an error naming the call.
    fn check(&self, what: &str, r: NvrtcResult) -> Result<(), String> {
        if r == 0 {
            return Ok(());
        }
        // SAFETY: NVRTC returns a static string for any result code.
        let s = unsafe { (self.error_string)(r) };
        let text = if s.is_null() {
            format!("error {r}")
        } else {
            // SAFETY: non-null, NUL-terminated, static.
            unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
        };
        Err(format!("{what} failed: {text}"))
    }

    fn version(&self) -> Result<(u32, u32), String> {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: valid out-pointers.
        self.check("nvrtcVersion", unsafe {
            (self.version)(&mut major, &mut minor)
        })?;
        Ok((major.max(0) as u32, minor.max(0) as u32))
    }
}

/// The NVRTC in use: its entry points, version, place, and what to compile to for this driver.
pub struct Nvrtc {
    api: Api,
    /// Where it was found (a path, or how).
    pub place: String,
    pub version: (u32, u32),
    pub output: Output,
    /// The driver's CUDA (major, minor), when a driver is installed.
    pub driver: Option<(u32, u32)>,
}

/// A compiled module image (PTX text with its NUL, or a cubin) or NVRTC's error with its log.
pub struct CompileError {
    pub message: String,
    pub log: String,
}

impl Nvrtc {
    /// The virtual architectures (e.g. 90 for compute_90) this NVRTC can target, ascending.
    pub fn supported_archs(&self) -> Result<Vec<i32>, String> {
        let mut n = 0;
        // SAFETY: valid out-pointer; the buffer holds `n` entries.
        unsafe {
            self.api
                .check("nvrtcGetNumSupportedArchs", (self.api.num_archs)(&mut n))?;
            let mut archs = vec![0; n.max(0) as usize];
            self.api.check(
                "nvrtcGetSupportedArchs",
                (self.api.archs)(archs.as_mut_ptr()),
            )?;
            archs.sort_unstable();
            Ok(archs)
        }
    }

    /// Compiles `code` (file name `name`) with `options` and returns the PTX (NUL-terminated) or
    /// the cubin. `headers`: (include name, source) pairs `#include "name"` resolves to.
    pub fn compile(
        &self,
        code: &CStr,
        name: &CStr,
        headers: &[(&CStr, &CStr)],
        options: &[String],
        output: Output,
    ) -> Result<Vec<u8>, CompileError> {
        let fail = |message: String| CompileError {
            message,
            log: String::new(),
        };
        let opts: Vec<std::ffi::CString> = options
            .iter()
            .map(|o| std::ffi::CString::new(o.as_str()).expect("options have no NUL"))
            .collect();
        let opt_ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
        let header_names: Vec<*const c_char> = headers.iter().map(|h| h.0.as_ptr()).collect();
        let header_sources: Vec<*const c_char> = headers.iter().map(|h| h.1.as_ptr()).collect();
        let api = &self.api;
        let mut prog: Program = std::ptr::null_mut();
        // SAFETY: `code`/`name`/`headers` outlive the program, which is destroyed below; every
        // buffer is sized by NVRTC's own size query.
        unsafe {
            let created = (api.create)(
                &mut prog,
                code.as_ptr(),
                name.as_ptr(),
                headers.len() as c_int,
                header_sources.as_ptr(),
                header_names.as_ptr(),
            );
            api.check("nvrtcCreateProgram", created).map_err(fail)?;
            let compiled = api.check(
                "nvrtcCompileProgram",
                (api.compile)(prog, opt_ptrs.len() as c_int, opt_ptrs.as_ptr()),
            );
            let log = self.read(prog, api.log_size, api.log).unwrap_or_default();
            let log = String::from_utf8_lossy(log.split(|&b| b == 0).next().unwrap_or(&[]))
                .trim()
                .to_string();
            let image = compiled.and_then(|()| match output {
                Output::Ptx => self.read(prog, api.ptx_size, api.ptx),
                Output::Cubin => self.read(prog, api.cubin_size, api.cubin),
            });
            let _ = (api.destroy)(&mut prog);
            image.map_err(|message| CompileError { message, log })
        }
    }

    /// One of NVRTC's (size, buffer) outputs.
    unsafe fn read(
        &self,
        prog: Program,
        size: unsafe extern "C" fn(Program, *mut usize) -> NvrtcResult,
        get: unsafe extern "C" fn(Program, *mut c_char) -> NvrtcResult,
    ) -> Result<Vec<u8>, String> {
        let mut n = 0usize;
        self.api.check("nvrtcGet*Size", size(prog, &mut n))?;
        let mut buf = vec![0u8; n];
        self.api
            .check("nvrtcGet*", get(prog, buf.as_mut_ptr() as *mut c_char))?;
        Ok(buf)
    }
}

/// Finds, selects and loads NVRTC for this process (once).
pub fn nvrtc() -> Result<&'static Nvrtc, &'static str> {
    static LOADED: OnceLock<Result<Nvrtc, String>> = OnceLock::new();
    LOADED.get_or_init(load).as_ref().map_err(|s| s.as_str())
}

fn load() -> Result<Nvrtc, String> {
    let forced = forced_major(std::env::var(FORCE_MAJOR_ENV).ok().as_deref())?;
    let driver = culib::driver_version().map(decode_driver_version);
    let (mut found, mut apis, mut searched) = (Vec::new(), Vec::new(), Vec::new());
    for &major in MAJORS.iter().filter(|&&m| forced.map_or(true, |f| f == m)) {
        let (lib, place) = match culib::find(&NVRTC, major) {
            Ok(hit) => hit,
            Err(tried) => {
                searched.extend(tried);
                continue;
            }
        };
        let place = lib
            .file_of("nvrtcVersion")
            .map(|p| p.display().to_string())
            .unwrap_or(place);
        match Api::load(&lib).and_then(|api| Ok((api.version()?, api))) {
            Ok(((maj, min), api)) => {
                found.push(Found {
                    major: maj,
                    minor: min,
                    place,
                });
                apis.push(api);
            }
            Err(e) => searched.push(format!("{place} ({e})")),
        }
    }
    let choice = select(driver, &found, forced, &searched)?;
    let f = &found[choice.index];
    Ok(Nvrtc {
        api: apis.swap_remove(choice.index),
        place: f.place.clone(),
        version: (f.major, f.minor),
        output: choice.output,
        driver,
    })
}
