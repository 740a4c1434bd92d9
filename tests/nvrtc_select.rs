//! Which NVRTC runs on which driver (no GPU needed): `nvrtc_lib::select` for every combination
//! of driver version, NVRTCs found and `CALIBRL_NVRTC_MAJOR`, against CUDA's compatibility
//! rules restated here (docs/cuda.md): a driver runs its own CUDA major or an older one; PTX
//! needs a driver at least as new as the NVRTC; an NVRTC newer than the driver within the same
//! major compiles to a cubin; the driver's own major is preferred.

use calibrl::cuda::nvrtc_lib::{decode_driver_version, forced_major, select, Found, Output};

fn found(versions: &[(u32, u32)]) -> Vec<Found> {
    versions
        .iter()
        .map(|&(major, minor)| Found {
            major,
            minor,
            place: format!("/site/nvrtc-{major}.{minor}/libnvrtc.so.{major}"),
        })
        .collect()
}

const SEARCHED: [&str; 2] = [
    "/site/nvidia/cu13/lib/libnvrtc.so.13",
    "/usr/local/cuda/lib64/libnvrtc.so.13",
];

fn searched() -> Vec<String> {
    SEARCHED.iter().map(|s| s.to_string()).collect()
}

/// (version chosen, output) or the error.
fn pick(
    driver: Option<(u32, u32)>,
    nvrtcs: &[(u32, u32)],
    forced: Option<u32>,
) -> Result<((u32, u32), Output), String> {
    let f = found(nvrtcs);
    select(driver, &f, forced, &searched())
        .map(|c| ((f[c.index].major, f[c.index].minor), c.output))
}

#[test]
fn a_12_4_driver_with_only_nvrtc_13_names_the_fix() {
    let err = pick(Some((12, 4)), &[(13, 0)], None).unwrap_err();
    println!("{err}");
    for want in [
        "CUDA 12.4",
        "pip install calibrl[cuda12]",
        "NVRTC 13.0 at /site/nvrtc-13.0/libnvrtc.so.13",
        "needs a CUDA 13 driver (≥ 580)",
        SEARCHED[0],
        SEARCHED[1],
    ] {
        assert!(err.contains(want), "missing {want:?} in: {err}");
    }
}

/// (driver, NVRTCs found, forced major, the expected (version, output) or `None` for an error).
type Case = (
    Option<(u32, u32)>,
    &'static [(u32, u32)],
    Option<u32>,
    Option<((u32, u32), Output)>,
);

#[test]
fn the_listed_cases() {
    use Output::{Cubin, Ptx};
    let cases: &[Case] = &[
        // 13 on a 13.x driver, PTX (the driver is at least as new).
        (
            Some((13, 0)),
            &[(13, 0), (12, 9)],
            None,
            Some(((13, 0), Ptx)),
        ),
        (Some((13, 1)), &[(13, 0)], None, Some(((13, 0), Ptx))),
        // A newer 13.x NVRTC on a 13.0 driver: cubin.
        (Some((13, 0)), &[(13, 1)], None, Some(((13, 1), Cubin))),
        // Forced 12 on a 13 driver: PTX (older major, backward compatible).
        (
            Some((13, 0)),
            &[(13, 0), (12, 9)],
            Some(12),
            Some(((12, 9), Ptx)),
        ),
        // Only 12 on a 13 driver: used.
        (Some((13, 0)), &[(12, 9)], None, Some(((12, 9), Ptx))),
        // 12.9 on a 12.4 driver: cubin; on a 12.9 driver: PTX.
        (
            Some((12, 4)),
            &[(13, 0), (12, 9)],
            None,
            Some(((12, 9), Cubin)),
        ),
        (
            Some((12, 9)),
            &[(13, 0), (12, 9)],
            None,
            Some(((12, 9), Ptx)),
        ),
        (Some((12, 4)), &[(12, 4)], None, Some(((12, 4), Ptx))),
        // Nothing a 12 driver can run, or forced to an absent major.
        (Some((12, 4)), &[(13, 0)], None, None),
        (Some((12, 4)), &[(13, 0), (12, 9)], Some(13), None),
        (Some((13, 0)), &[(13, 0)], Some(12), None),
        // Too old a driver, whatever is found.
        (Some((11, 8)), &[(13, 0), (12, 9)], None, None),
        // No driver (compile-only): the newest major, PTX.
        (None, &[(13, 0), (12, 9)], None, Some(((13, 0), Ptx))),
        (None, &[(12, 9)], None, Some(((12, 9), Ptx))),
        (None, &[(13, 0), (12, 9)], Some(12), Some(((12, 9), Ptx))),
        (None, &[], None, None),
    ];
    for (driver, nvrtcs, forced, want) in cases {
        let got = pick(*driver, nvrtcs, *forced);
        assert_eq!(
            got.as_ref().ok(),
            want.as_ref(),
            "driver {driver:?}, NVRTC {nvrtcs:?}, forced {forced:?}: {got:?}"
        );
    }
}

#[test]
fn every_combination_follows_the_rules() {
    let drivers: Vec<Option<(u32, u32)>> = [None]
        .into_iter()
        .chain(
            [
                (11, 8),
                (12, 0),
                (12, 2),
                (12, 4),
                (12, 8),
                (12, 9),
                (13, 0),
                (13, 1),
                (14, 0),
            ]
            .map(Some),
        )
        .collect();
    let nvrtc12 = [None, Some((12, 0)), Some((12, 4)), Some((12, 9))];
    let nvrtc13 = [None, Some((13, 0)), Some((13, 1))];
    let mut checked = 0;
    for driver in &drivers {
        for n13 in nvrtc13 {
            for n12 in nvrtc12 {
                // The loader lists what it found in preference order: 13 first.
                let nvrtcs: Vec<(u32, u32)> = [n13, n12].into_iter().flatten().collect();
                for forced in [None, Some(12), Some(13)] {
                    check(*driver, &nvrtcs, forced);
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 10 * 3 * 4 * 3);
}

/// The rules, restated: what may be chosen, and that an error happens only when nothing fits.
fn check(driver: Option<(u32, u32)>, nvrtcs: &[(u32, u32)], forced: Option<u32>) {
    let ctx = format!("driver {driver:?}, NVRTC {nvrtcs:?}, forced {forced:?}");
    let allowed = |&(m, _): &(u32, u32)| forced.map_or(true, |f| f == m);
    let runs = |&(m, _): &(u32, u32)| match driver {
        None => true,
        Some((dm, _)) if dm < 12 => false,
        // Same major: PTX or a cubin; an older major: PTX.
        Some((dm, _)) => m <= dm,
    };
    let candidates: Vec<(u32, u32)> = nvrtcs
        .iter()
        .copied()
        .filter(|v| allowed(v) && runs(v))
        .collect();
    match pick(driver, nvrtcs, forced) {
        Ok((v, output)) => {
            assert!(candidates.contains(&v), "{ctx}: chose {v:?}");
            // The newest usable major wins.
            let best = candidates.iter().map(|c| c.0).max().unwrap();
            assert_eq!(v.0, best, "{ctx}: chose {v:?}");
            let want = match driver {
                Some((dm, dn)) if v.0 == dm && v.1 > dn => Output::Cubin,
                _ => Output::Ptx,
            };
            assert_eq!(output, want, "{ctx}");
        }
        Err(e) => {
            assert!(
                candidates.is_empty(),
                "{ctx}: refused with {candidates:?} usable: {e}"
            );
            let fix = match driver {
                Some((dm, _)) if dm < 12 => "update the NVIDIA driver",
                Some((dm, _)) if forced.is_some_and(|m| m > dm) => "update the driver to CUDA 13",
                _ if forced == Some(12) => "calibrl[cuda12]",
                _ if forced == Some(13) => "calibrl[cuda13]",
                Some((12, _)) => "calibrl[cuda12]",
                _ => "calibrl[cuda13]",
            };
            assert!(e.contains(fix), "{ctx}: no {fix:?} in: {e}");
            if driver.map_or(true, |(dm, _)| dm >= 12) {
                for s in SEARCHED {
                    assert!(e.contains(s), "{ctx}: {s} not named in: {e}");
                }
                for (m, n) in nvrtcs {
                    assert!(
                        e.contains(&format!("NVRTC {m}.{n} at")),
                        "{ctx}: {m}.{n} not named: {e}"
                    );
                }
            }
        }
    }
}

#[test]
fn driver_versions_decode() {
    assert_eq!(decode_driver_version(12040), (12, 4));
    assert_eq!(decode_driver_version(12090), (12, 9));
    assert_eq!(decode_driver_version(13000), (13, 0));
    assert_eq!(decode_driver_version(11080), (11, 8));
}

#[test]
fn the_force_variable_is_checked() {
    assert_eq!(forced_major(None), Ok(None));
    assert_eq!(forced_major(Some("")), Ok(None));
    assert_eq!(forced_major(Some("12")), Ok(Some(12)));
    assert_eq!(forced_major(Some(" 13 ")), Ok(Some(13)));
    for bad in ["11", "14", "twelve", "12.9"] {
        let e = forced_major(Some(bad)).unwrap_err();
        assert!(e.contains("CALIBRL_NVRTC_MAJOR") && e.contains(bad), "{e}");
    }
}
