//! Compiles `tests/c/smoke.c` with the system C compiler against `include/calibrl.h`
//! (`-std=c99 -Wall -Wextra -Werror -pedantic`), links the built `libcalibrl.so` through its
//! SONAME (as an installed copy is: `libcalibrl.so -> libcalibrl.so.0 -> the file`), runs it and
//! compares what it prints with the Rust API's numbers for the same batch.

mod common;

use calibrl::cpu::loss::{compute, ExpertBaseline, LossBatch};
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

fn compiler() -> Option<String> {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    Command::new(&cc)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|_| cc)
}

#[test]
fn c_program_compiles_runs_and_agrees_with_rust() {
    let Some(cc) = compiler() else {
        println!("SKIPPED: no C compiler (set CC or install cc)");
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = common::cdylib_path();
    let out_dir = lib.parent().unwrap().join("c-smoke");
    // The installed layout (scripts/install.sh): the program must record and load the SONAME.
    let lib_dir = common::installed_lib_dir(&lib, &out_dir);
    let lib_dir = lib_dir.as_path();
    let exe = out_dir.join("smoke");
    let compile = Command::new(&cc)
        .args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-o"])
        .arg(&exe)
        .arg(root.join("tests/c/smoke.c"))
        .arg("-I")
        .arg(root.join("include"))
        .arg("-L")
        .arg(lib_dir)
        .arg("-lcalibrl")
        .arg("-lm")
        .output()
        .expect("run the C compiler");
    assert!(
        compile.status.success(),
        "C compile failed:\n{}",
        String::from_utf8_lossy(&compile.stderr)
    );
    let needed = common::readelf_dynamic(&exe, "Shared library");
    assert!(
        needed.iter().any(|n| n == "libcalibrl.so.0"),
        "the C program should record NEEDED libcalibrl.so.0, got {needed:?}"
    );
    let run = Command::new(&exe)
        .env("LD_LIBRARY_PATH", lib_dir)
        .output()
        .expect("run the C program");
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(
        run.status.success(),
        "C program failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let lines: Vec<Vec<&str>> = stdout.lines().map(|l| l.split(' ').collect()).collect();
    let find = |key: &'static str| lines.iter().filter(move |l| l[0] == key);
    assert_eq!(
        find("version").next().unwrap()[1],
        env!("CARGO_PKG_VERSION")
    );
    assert!(find("done").next().is_some());

    // The same batch through the Rust API.
    let cfg = common::config(r#"{"preset":"paper","lambda":0.2}"#);
    let printed_cfg = &stdout.lines().find(|l| l.starts_with("config ")).unwrap()[7..];
    assert_eq!(calibrl::Config::from_json(printed_cfg).unwrap(), cfg);
    let rewards = [1.0, 0.0, 1.0, 0.0, 0.0, 1.0];
    let adv = calibrl::rarity::group_advantages(&cfg, &rewards, &[0, 0, 0, 1, 1, 1], 2, None, None)
        .unwrap();
    for l in find("adv") {
        let i: usize = l[1].parse().unwrap();
        let v: Vec<f64> = l[2..5].iter().map(|s| s.parse().unwrap()).collect();
        assert_eq!(
            v,
            vec![adv.advantages[i], adv.weights[i], adv.signs[i]],
            "advantages row {i}"
        );
    }
    let logp: Vec<f64> = (0..15)
        .map(|i| -0.05 - 0.1 * ((i * 7) % 13) as f64)
        .collect();
    let old: Vec<f64> = (0..15)
        .map(|i| logp[i] + 0.03 * ((i % 5) as f64 - 2.0))
        .collect();
    let elogp: Vec<f64> = (0..7).map(|i| -0.2 - 0.15 * ((i * 3) % 5) as f64).collect();
    let offs = [0usize, 3, 5, 9, 10, 13, 15];
    let batch = LossBatch {
        rows: (0..6).map(|i| offs[i]..offs[i + 1]).collect(),
        logprobs: logp,
        mask: vec![1.0; 15],
        old_logprobs: Some(old),
        ref_logprobs: None,
        entropy: None,
        token_weights: None,
        advantages: adv.advantages.clone(),
        weights: adv.weights.clone(),
        signs: adv.signs.clone(),
        is_expert: None,
        expert: Some(ExpertBaseline {
            rows: vec![0..4, 4..7],
            logprobs: elogp,
            mask: vec![1.0; 7],
            index: vec![0, 0, 0, 1, 1, 1],
        }),
        normalizers: None,
    };
    let out = compute(&cfg, &batch).unwrap();
    let m = out.metrics;
    let want: HashMap<&str, f64> = [
        ("loss", m.loss),
        ("pg_loss", m.pg_loss),
        ("explore_loss", m.explore_loss),
        ("clipfrac", m.clipfrac),
        ("mean_delta", m.mean_delta),
        ("mean_rarity_weight", m.mean_rarity_weight),
        ("num_tokens", m.num_tokens),
    ]
    .into_iter()
    .collect();
    let mut seen = 0;
    for l in find("metric") {
        let v: f64 = l[2].parse().unwrap();
        common::assert_close(&format!("C metric {}", l[1]), v, want[l[1]], 1e-15, 0.0);
        seen += 1;
    }
    assert_eq!(seen, want.len());
    assert!(
        m.explore_loss != 0.0 && m.loss != 0.0,
        "a non-trivial batch"
    );
    for l in find("grad") {
        let i: usize = l[1].parse().unwrap();
        let v: f64 = l[2].parse().unwrap();
        common::assert_close(&format!("C grad {i}"), v, out.grad_logprobs[i], 1e-15, 0.0);
    }
    // The reference agrees too.
    let reference = common::reference::ref_loss(
        &cfg,
        &common::reference::RefBatch {
            rows: batch.rows.clone(),
            logp: batch.logprobs.clone(),
            mask: batch.mask.clone(),
            old: batch.old_logprobs.clone(),
            refl: None,
            ent: None,
            adv: batch.advantages.clone(),
            w: batch.weights.clone(),
            c: batch.signs.clone(),
            is_expert: vec![false; 6],
            expert: Some(common::reference::RefExpert {
                rows: vec![0..4, 4..7],
                logp: batch.expert.as_ref().unwrap().logprobs.clone(),
                mask: vec![1.0; 7],
                index: vec![0, 0, 0, 1, 1, 1],
            }),
            norm: None,
            sg_logp: None,
            tw: None,
        },
    );
    common::assert_close("reference loss", m.loss, reference.m.loss, 1e-12, 1e-14);
    // The bad call: NULL seq_offsets → CALIBRL_STATUS_NULL_ARGUMENT naming it.
    let bad = find("bad").next().unwrap();
    assert_eq!(bad[1], "1");
    assert!(bad[2..].join(" ").contains("`seq_offsets`"), "{bad:?}");
}
