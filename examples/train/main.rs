//! The main job: a real RL training run that shows what CalibRL does, and what it does not.
//!
//!     cargo run --release --example train -- [--task reach|sums] [--method NAME|all]
//!         [--seed N] [--seeds K] [--steps N] [--alpha A] [--lambda L] [--sweep] [--out DIR]
//!
//! Trains a log-linear policy from its base initialisation on a verifiable task with expert
//! solutions, once per arm and seed (seeds N .. N+K−1, the same prompts, sampling streams and
//! step budget for every arm). The default task, `reach` (engine/reach.rs), has many correct
//! answers per prompt, an expert that always shows one verbose style, and an out-of-distribution
//! split that the expert's style cannot solve within the length budget. Arms: GRPO, GRPO with an
//! entropy bonus, SFT-then-GRPO, LUFFY, RL-PLUS, CalibRL, and CalibRL's α sweep (0.3, 0.8);
//! `--sweep` adds the λ sweep. Prints the results table (mean ± 95% CI over seeds) and writes
//! pictures (SVG, and PNG where `rsvg-convert` is installed) and CSVs under DIR (default `out`).
//! See docs/training.md.

mod engine;

use engine::report::{self, Arm};
use engine::task::Task;
use engine::trainer::{train, Method, RunResult, Settings};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

fn usage() -> ! {
    eprintln!(
        "usage: train [--task reach|sums] [--method grpo|entropy|sft-grpo|luffy|rlplus|calibrl|all] \
         [--seed N] [--seeds K] [--steps N] [--alpha A] [--lambda L] [--sweep] [--out DIR]"
    );
    std::process::exit(2)
}

fn parse<T: std::str::FromStr>(flag: &str, value: &str) -> T {
    value.parse().unwrap_or_else(|_| {
        eprintln!("bad value {value:?} for {flag}");
        usage()
    })
}

/// An arm to run: a method and its CalibRL settings.
struct ArmSpec {
    label: String,
    method: Method,
    alpha: f64,
    lambda: f64,
}

fn main() {
    let mut base = Settings::default();
    let mut only: Option<Method> = None;
    let mut out = PathBuf::from("out");
    let mut seeds: u64 = 20;
    let mut sweep = false;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--sweep" {
            sweep = true;
            continue;
        }
        let value = args.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--task" => base.task = Task::parse(&value).unwrap_or_else(|| usage()),
            "--method" if value == "all" => only = None,
            "--method" => only = Some(Method::parse(&value).unwrap_or_else(|| usage())),
            "--seed" => base.seed = parse(&flag, &value),
            "--seeds" => seeds = parse::<u64>(&flag, &value).max(1),
            "--steps" => base.steps = parse::<usize>(&flag, &value).max(1),
            "--alpha" => base.alpha = parse(&flag, &value),
            "--lambda" => base.lambda = parse(&flag, &value),
            "--out" => out = PathBuf::from(value),
            _ => usage(),
        }
    }
    base.sft_steps = base.sft_steps.min(base.steps);

    // The arms: every method at the given α, λ; then CalibRL's sweeps.
    let spec = |label: String, method, alpha, lambda| ArmSpec {
        label,
        method,
        alpha,
        lambda,
    };
    let mut arms: Vec<ArmSpec> = Method::ALL
        .into_iter()
        .filter(|m| only.map_or(true, |o| o == *m))
        .map(|m| spec(m.name().to_string(), m, base.alpha, base.lambda))
        .collect();
    let calibrl = only.map_or(true, |o| o == Method::Calibrl);
    if calibrl {
        for a in [0.3, 0.8] {
            if a != base.alpha {
                arms.push(spec(
                    format!("calibrl α={a}"),
                    Method::Calibrl,
                    a,
                    base.lambda,
                ));
            }
        }
        if sweep {
            for l in [0.01, 0.03, 0.05, 0.3, 0.5] {
                if l != base.lambda {
                    arms.push(spec(
                        format!("calibrl λ={l}"),
                        Method::Calibrl,
                        base.alpha,
                        l,
                    ));
                }
            }
        }
    }

    println!("{}", base.task.describe());
    println!(
        "budget per run: {} steps × {} prompts × G = {} rollouts, same for every arm; seeds {}..={}; \
         CalibRL α = {}, λ = {}; {} arms",
        base.steps,
        base.task.dataset(base.seed).train.len() * base.prompts_per_pool,
        base.group_size,
        base.seed,
        base.seed + seeds - 1,
        base.alpha,
        base.lambda,
        arms.len()
    );

    // Every (arm, seed) run is independent and deterministic: run them on all cores, keep the
    // results in a fixed order.
    let start = Instant::now();
    let jobs: Vec<(usize, u64)> = (0..arms.len())
        .flat_map(|a| (base.seed..base.seed + seeds).map(move |s| (a, s)))
        .collect();
    let results: Mutex<Vec<Option<RunResult>>> = Mutex::new(vec![None; jobs.len()]);
    let next = AtomicUsize::new(0);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let j = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(a, seed)) = jobs.get(j) else { break };
                let s = Settings {
                    seed,
                    alpha: arms[a].alpha,
                    lambda: arms[a].lambda,
                    ..base.clone()
                };
                let r = train(arms[a].method, &s, &s.task.dataset(seed));
                results.lock().expect("no worker panicked")[j] = Some(r);
            });
        }
    });
    let mut results = results
        .into_inner()
        .expect("no worker panicked")
        .into_iter();
    let done: Vec<Arm> = arms
        .iter()
        .map(|a| Arm {
            label: a.label.clone(),
            runs: (0..seeds)
                .map(|_| results.next().flatten().expect("run finished"))
                .collect(),
        })
        .collect();
    println!(
        "{} runs on {threads} threads in {:.1} s\n",
        jobs.len(),
        start.elapsed().as_secs_f64()
    );

    print!("{}", report::table(&done));
    println!(
        "mean ± 95% CI (Student t) over {seeds} seeds, after {} steps; n = {} samples per prompt at \
         T = 1. pass@8: unbiased estimate from the n samples. distinct correct: different correct \
         responses per ID prompt among its n samples. entropy (nats/token), mean Δ = S − E \
         (sequence log-prob of a sample minus its prompt's expert response) and length (tokens \
         incl. EOS) over the ID samples.",
        base.steps, base.eval_samples
    );
    if done.len() > 1 && seeds > 1 {
        println!();
        print!("{}", report::paired_table(&done));
        println!(
            "mean ± 95% CI of the per-seed difference (same seeds, prompts and sampling streams)."
        );
    }

    std::fs::create_dir_all(&out).expect("create the output directory");
    let mut written = Vec::new();
    let mut write = |name: &str, text: String| {
        let path = out.join(name);
        std::fs::write(&path, text).expect("write an output file");
        written.push(path);
    };
    write("evals.csv", report::evals_csv(&done));
    write("steps.csv", report::steps_csv(&done));
    let methods: Vec<Arm> = done
        .iter()
        .take_while(|a| !a.label.contains('='))
        .cloned()
        .collect();
    let title = format!(
        "task {}: mean and 95% CI over {seeds} seeds (evaluated every {} steps)",
        base.task.name(),
        base.eval_every
    );
    write("curves.svg", report::curves_svg(&methods, &title));
    // Sweep panels: CalibRL arms in order of the swept value, the main arm among them.
    let sweep_of = |key: &str, value: fn(&ArmSpec) -> f64| {
        let mut g: Vec<(f64, String, &Arm)> = arms
            .iter()
            .zip(&done)
            .filter(|(a, _)| {
                a.method == Method::Calibrl && (a.label == "calibrl" || a.label.contains(key))
            })
            .map(|(a, d)| (value(a), format!("{key}={}", value(a)), d))
            .collect();
        g.sort_by(|x, y| x.0.total_cmp(&y.0));
        g.into_iter().map(|(_, l, d)| (l, d)).collect::<Vec<_>>()
    };
    let mut groups = vec![("CalibRL α sweep", sweep_of("α", |a| a.alpha))];
    if sweep {
        groups.push(("CalibRL λ sweep", sweep_of("λ", |a| a.lambda)));
    }
    if groups[0].1.len() > 1 {
        write(
            "sweep.svg",
            report::sweep_svg(&groups, done.iter().find(|a| a.label == "grpo")),
        );
    }
    if done
        .iter()
        .flat_map(|a| &a.runs)
        .any(|r| r.last().ood_pass1.is_finite())
    {
        let t = format!(
            "OOD pass@1 after {} steps (mean, 95% CI, {seeds} seeds)",
            base.steps
        );
        write("ood.svg", report::bars_svg(&done, &t, |e| e.ood_pass1));
    }
    let svgs: Vec<PathBuf> = written
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "svg"))
        .cloned()
        .collect();
    let pngs = to_png(&svgs);
    for p in written.iter().chain(&pngs) {
        println!("wrote {}", p.display());
    }
    if pngs.is_empty() {
        println!("(PNG copies need rsvg-convert: apt-get install librsvg2-bin)");
    }
    println!("total time {:.1} s", start.elapsed().as_secs_f64());
}

/// PNG copies of the SVGs with rsvg-convert (Debian's librsvg2-bin), where it is installed.
fn to_png(svgs: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for svg in svgs {
        let png = svg.with_extension("png");
        let ok = std::process::Command::new("rsvg-convert")
            .args(["--zoom", "1.5", "-o"])
            .arg(&png)
            .arg(svg)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return out;
        }
        out.push(png);
    }
    out
}
