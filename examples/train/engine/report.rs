//! Output of a comparison: the results table (mean ± standard deviation over seeds), a CSV of
//! every run's curves and an SVG plot of the seed-averaged curves, written by hand (no plotting
//! dependency). `runs[m]` holds method m's runs, one per seed.

use super::trainer::{Eval, RunResult, StepLog};
use std::fmt::Write as _;

/// Mean and sample standard deviation (0 for one value).
fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

fn cell(runs: &[RunResult], f: impl Fn(&Eval) -> f64, digits: usize) -> String {
    let (m, sd) = mean_sd(&runs.iter().map(|r| f(&r.last)).collect::<Vec<_>>());
    if runs.len() > 1 {
        format!("{m:.digits$} ± {sd:.digits$}")
    } else {
        format!("{m:.digits$}")
    }
}

pub fn table(runs: &[Vec<RunResult>]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| method   | held-out pass (greedy) | held-out pass (sampled) | entropy         | mean Δ         | response length |"
    );
    let _ = writeln!(
        s,
        "|----------|------------------------|-------------------------|-----------------|----------------|-----------------|"
    );
    for r in runs {
        let _ = writeln!(
            s,
            "| {:<8} | {:<22} | {:<23} | {:<15} | {:<14} | {:<15} |",
            r[0].method.name(),
            cell(r, |e| e.greedy, 3),
            cell(r, |e| e.sampled, 3),
            cell(r, |e| e.entropy, 3),
            cell(r, |e| e.delta, 2),
            cell(r, |e| e.length, 2),
        );
    }
    let initial: Vec<f64> = runs.iter().flatten().map(|r| r.initial.greedy).collect();
    let sampled: Vec<f64> = runs.iter().flatten().map(|r| r.initial.sampled).collect();
    let _ = writeln!(
        s,
        "initial policy: held-out pass {:.3} (greedy), {:.3} (sampled)",
        mean_sd(&initial).0,
        mean_sd(&sampled).0
    );
    s
}

pub fn csv(runs: &[Vec<RunResult>]) -> String {
    let mut s =
        String::from("method,seed,step,reward,entropy,mean_delta,response_length,heldout_greedy\n");
    for r in runs.iter().flatten() {
        for l in &r.log {
            let _ = writeln!(
                s,
                "{},{},{},{},{},{},{},{}",
                r.method.name(),
                r.seed,
                l.step,
                l.reward,
                l.entropy,
                l.mean_delta,
                l.length,
                l.heldout_greedy
            );
        }
    }
    s
}

const COLORS: [&str; 5] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"];
const PANEL_W: f64 = 360.0;
const PANEL_H: f64 = 240.0;
const MARGIN: f64 = 50.0;

/// Three panels side by side (training reward, rollout entropy, held-out greedy pass rate)
/// against the step, one seed-averaged line per method, with a legend.
pub fn svg(runs: &[Vec<RunResult>]) -> String {
    type Series = fn(&StepLog) -> f64;
    let panels: [(&str, Series); 3] = [
        ("training reward (sampled)", |l| l.reward),
        ("policy entropy (nats/token)", |l| l.entropy),
        ("held-out pass rate (greedy)", |l| l.heldout_greedy),
    ];
    let steps = runs
        .iter()
        .flatten()
        .map(|r| r.log.len())
        .max()
        .unwrap_or(0);
    let averaged = |f: Series| -> Vec<Vec<f64>> {
        runs.iter()
            .map(|seeds| {
                (0..steps)
                    .map(|t| mean_sd(&seeds.iter().map(|r| f(&r.log[t])).collect::<Vec<_>>()).0)
                    .collect()
            })
            .collect()
    };
    let width = panels.len() as f64 * (PANEL_W + MARGIN) + MARGIN;
    let height = PANEL_H + 2.5 * MARGIN + 20.0 * runs.len() as f64;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (pi, (title, f)) in panels.iter().enumerate() {
        let curves = averaged(*f);
        let x0 = MARGIN + pi as f64 * (PANEL_W + MARGIN);
        let y0 = MARGIN;
        let finite = curves.iter().flatten().filter(|v| v.is_finite());
        let ymax = finite.fold(0.0f64, |a, &b| a.max(b)).max(1e-9) * 1.05;
        let last = steps.max(2) - 1;
        let px = |step: usize| x0 + PANEL_W * step as f64 / last as f64;
        let py = |v: f64| y0 + PANEL_H * (1.0 - v / ymax);
        let _ = writeln!(
            s,
            r#"<rect x="{x0}" y="{y0}" width="{PANEL_W}" height="{PANEL_H}" fill="none" stroke="black"/>"#
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle" font-weight="bold">{title}</text>"#,
            x0 + PANEL_W / 2.0,
            y0 - 10.0
        );
        for k in 0..=4 {
            let v = ymax * k as f64 / 4.0;
            let y = py(v);
            let _ = writeln!(
                s,
                r##"<line x1="{x0}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{v:.2}</text>"##,
                x0 + PANEL_W,
                x0 - 4.0,
                y + 4.0
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{x0}" y="{}">step 0</text><text x="{}" y="{}" text-anchor="end">step {last}</text>"#,
            y0 + PANEL_H + 15.0,
            x0 + PANEL_W,
            y0 + PANEL_H + 15.0
        );
        for (ri, curve) in curves.iter().enumerate() {
            let points: Vec<String> = curve
                .iter()
                .enumerate()
                .filter(|(_, v)| v.is_finite())
                .map(|(t, &v)| format!("{:.1},{:.1}", px(t), py(v)))
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{}" stroke-width="1.5" points="{}"/>"#,
                COLORS[ri % COLORS.len()],
                points.join(" ")
            );
        }
    }
    let seeds = runs.first().map_or(0, Vec::len);
    for (ri, r) in runs.iter().enumerate() {
        let y = MARGIN + PANEL_H + 35.0 + 20.0 * ri as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{MARGIN}" y1="{y}" x2="{}" y2="{y}" stroke="{}" stroke-width="3"/><text x="{}" y="{}">{} (mean of {seeds} seeds)</text>"#,
            MARGIN + 30.0,
            COLORS[ri % COLORS.len()],
            MARGIN + 38.0,
            y + 4.0,
            r[0].method.name()
        );
    }
    s.push_str("</svg>\n");
    s
}
