//! calibrl_version, calibrl_abi_version, calibrl_status_name, calibrl_last_error_message,
//! calibrl_config_new / _to_json / _free.
#![no_main]

use calibrl::ffi::common::*;
use calibrl_fuzz::{config_json, config_keys, last_error, Bytes, Config, LAST_STATUS, OK};
use libfuzzer_sys::fuzz_target;
use std::ffi::CStr;

/// The generator produces every key the library knows (checked once per run).
fn generator_covers_every_key() {
    let json = calibrl::config::Config::default().to_json();
    let keys = config_keys();
    for part in json.trim_matches(|c| c == '{' || c == '}').split(',') {
        let key = part.split('"').nth(1).expect("a quoted key");
        assert!(
            keys.contains(&key),
            "the fuzz config generator never produces the key `{key}`"
        );
    }
}

static COVERAGE: std::sync::Once = std::sync::Once::new();

fuzz_target!(|data: &[u8]| {
    COVERAGE.call_once(generator_covers_every_key);
    let mut b = Bytes::new(data);
    let version = unsafe { CStr::from_ptr(calibrl_version()) };
    assert!(!version.to_bytes().is_empty());
    assert_eq!(calibrl_abi_version(), CALIBRL_ABI_VERSION);
    let status = b.u32() as i32;
    let name = unsafe { CStr::from_ptr(calibrl_status_name(status)) }
        .to_str()
        .unwrap();
    assert!(name.starts_with("CALIBRL_STATUS_"), "{name}");
    assert_eq!(
        (0..=LAST_STATUS).contains(&status),
        name != "CALIBRL_STATUS_UNKNOWN",
        "status {status}: {name}"
    );

    // Raw bytes as JSON half the time, structured JSON otherwise.
    let json = if b.rare(2) {
        String::from_utf8_lossy(data).into_owned()
    } else {
        config_json(&mut b)
    };
    let (st, cfg) = Config::new(&json);
    if st != OK {
        assert!(!last_error().is_empty());
    }
    // NULL json gives the default configuration.
    let mut out = std::ptr::null_mut();
    assert_eq!(
        unsafe { calibrl_config_new(std::ptr::null(), &mut out) } as i32,
        OK
    );
    unsafe { calibrl_config_free(out) };
    assert_ne!(
        unsafe { calibrl_config_new(std::ptr::null(), std::ptr::null_mut()) } as i32,
        OK
    );
    let Some(cfg) = cfg else { return };

    // to_json into an exact-size buffer of a fuzzed capacity, then a round trip.
    let mut len = usize::MAX;
    let st = unsafe { calibrl_config_to_json(cfg.0, std::ptr::null_mut(), 0, &mut len) } as i32;
    assert_eq!(st, 11, "size query");
    assert!(len < 1 << 20);
    let cap = if b.rare(2) { len + 1 } else { b.below(len + 2) };
    let mut buf = vec![0x55u8; cap];
    let mut len2 = 0usize;
    let st =
        unsafe { calibrl_config_to_json(cfg.0, buf.as_mut_ptr() as *mut _, cap, &mut len2) } as i32;
    assert_eq!(len2, len);
    if cap > len {
        assert_eq!(st, OK, "{}", last_error());
        assert_eq!(buf[len], 0);
        let text = std::str::from_utf8(&buf[..len]).unwrap();
        let (st, again) = Config::new(text);
        assert_eq!(st, OK, "round trip of {text}: {}", last_error());
        let mut buf2 = vec![0u8; len + 1];
        let mut len3 = 0;
        let st = unsafe {
            calibrl_config_to_json(
                again.unwrap().0,
                buf2.as_mut_ptr() as *mut _,
                len + 1,
                &mut len3,
            )
        } as i32;
        assert_eq!(st, OK);
        assert_eq!(buf2, buf[..len + 1], "round trip changed the configuration");
    } else {
        assert_eq!(st, 11, "capacity {cap} < {len} + 1");
        assert!(
            buf.iter().all(|&x| x == 0x55),
            "written on BUFFER_TOO_SMALL"
        );
    }
    assert_ne!(
        unsafe {
            calibrl_config_to_json(cfg.0, buf.as_mut_ptr() as *mut _, cap, std::ptr::null_mut())
        } as i32,
        OK
    );
});
