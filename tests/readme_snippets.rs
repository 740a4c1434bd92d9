//! The README's C program, compiled as a user would (`-std=c99 -Wall -Wextra -Werror
//! -pedantic` against `include/calibrl.h` and the built `libcalibrl.so`), run, and its printed
//! loss, mean Δ and gradient compared with the independent float64 reference on the same batch.
//! (The Python block runs in bindings/python/tests/test_readme.py, the C++ block in
//! scripts/cpp-tests.sh.)

mod common;

use std::path::Path;
use std::process::Command;

/// The body of the first fenced block of `lang` in README.md.
fn readme_block(lang: &str) -> String {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("read README.md");
    let fence = format!("```{lang}\n");
    let start = text.find(&fence).expect("a code block in README.md") + fence.len();
    let len = text[start..].find("```\n").expect("the block's end");
    text[start..start + len].to_string()
}

#[test]
#[allow(clippy::single_range_in_vec_init)] // one expert row: a Vec of one Range is meant
fn readme_c_program_compiles_runs_and_matches_the_reference() {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = common::cdylib_path();
    let dir = lib.parent().unwrap().join("readme-c");
    std::fs::create_dir_all(&dir).unwrap();
    // As the README builds it: against the installed layout (libcalibrl.so -> .so.0 -> file).
    let lib_dir = common::installed_lib_dir(&lib, &dir);
    let lib_dir = lib_dir.as_path();
    let (src, exe) = (dir.join("readme.c"), dir.join("readme"));
    std::fs::write(&src, readme_block("c")).unwrap();
    let compile = Command::new(&cc)
        .args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-o"])
        .arg(&exe)
        .arg(&src)
        .arg("-I")
        .arg(root.join("include"))
        .arg("-L")
        .arg(lib_dir)
        .arg("-lcalibrl")
        .output()
        .unwrap_or_else(|e| panic!("run the C compiler {cc:?} (set CC): {e}"));
    assert!(
        compile.status.success(),
        "the README's C program does not compile:\n{}",
        String::from_utf8_lossy(&compile.stderr)
    );
    let run = Command::new(&exe)
        .env("LD_LIBRARY_PATH", lib_dir)
        .output()
        .expect("run the README's C program");
    let out = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(
        run.status.success(),
        "the README's C program failed:\n{out}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    // "loss X  mean delta Y" then "dL/dlogprobs g0 g1 ...".
    let words: Vec<&str> = out.split_whitespace().collect();
    let num = |i: usize| -> f64 { words[i].parse().unwrap_or_else(|_| panic!("{out}")) };
    assert_eq!(
        (words[0], words[2], words[3], words[5]),
        ("loss", "mean", "delta", "dL/dlogprobs"),
        "{out}"
    );
    let grad: Vec<f64> = (6..words.len()).map(num).collect();

    // The README's batch: one prompt, rewards 1, 0, 0; rows of 2, 3 and 1 tokens; one expert
    // answer of 2 tokens; paper preset with λ = 0.1.
    let cfg = common::config(r#"{"preset": "paper", "lambda": 0.1}"#);
    let adv =
        common::reference::ref_group_advantages(&cfg, &[1.0, 0.0, 0.0], &[0, 0, 0], 1, None, None);
    let r = common::reference::ref_loss(
        &cfg,
        &common::reference::RefBatch {
            rows: vec![0..2, 2..5, 5..6],
            logp: vec![-0.2, -1.1, -0.7, -0.3, -2.0, -0.9],
            mask: vec![1.0; 6],
            old: Some(vec![-0.25, -1.0, -0.8, -0.3, -1.9, -1.0]),
            refl: None,
            ent: None,
            tw: None,
            adv: adv.advantages,
            w: adv.weights,
            c: adv.signs,
            is_expert: vec![false; 3],
            expert: Some(common::reference::RefExpert {
                rows: vec![0..2],
                logp: vec![-0.4, -0.6],
                mask: vec![1.0; 2],
                index: vec![0, 0, 0],
            }),
            norm: None,
            sg_logp: None,
        },
    );
    common::assert_close("README C loss", num(1), r.m.loss, 1e-8, 1e-12);
    common::assert_close("README C mean delta", num(4), r.m.mean_delta, 1e-8, 1e-12);
    assert_eq!(grad.len(), 6, "{out}");
    for (i, (&g, &want)) in grad.iter().zip(&r.grad_l).enumerate() {
        common::assert_close(&format!("README C dL/dlogprobs[{i}]"), g, want, 1e-8, 1e-12);
    }
    assert!(
        r.m.loss != 0.0 && r.m.explore_loss != 0.0,
        "a non-trivial batch"
    );
}
