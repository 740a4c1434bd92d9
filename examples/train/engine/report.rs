//! Output of a comparison: the results table, a CSV of the curves and an SVG plot written by
//! hand (no plotting dependency).

use super::trainer::{RunResult, StepLog};
use std::fmt::Write as _;

pub fn table(runs: &[RunResult]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| method   | held-out pass, greedy | held-out pass, sampled | entropy | mean Δ | response length |"
    );
    let _ = writeln!(
        s,
        "|----------|-----------------------|------------------------|---------|--------|-----------------|"
    );
    for r in runs {
        let _ = writeln!(
            s,
            "| {:<8} | {:>6.3} (from {:.3})   | {:>6.3} (from {:.3})    | {:>7.3} | {:>6.2} | {:>15.2} |",
            r.method.name(),
            r.last.greedy,
            r.initial.greedy,
            r.last.sampled,
            r.initial.sampled,
            r.last.entropy,
            r.late_delta(),
            r.last.length,
        );
    }
    s
}

pub fn csv(runs: &[RunResult]) -> String {
    let mut s =
        String::from("method,step,reward,entropy,mean_delta,response_length,heldout_greedy\n");
    for r in runs {
        for l in &r.log {
            let _ = writeln!(
                s,
                "{},{},{},{},{},{},{}",
                r.method.name(),
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
/// against the step, one line per method, with a legend.
pub fn svg(runs: &[RunResult]) -> String {
    type Series = fn(&StepLog) -> f64;
    let panels: [(&str, Series); 3] = [
        ("training reward (sampled)", |l| l.reward),
        ("policy entropy (nats/token)", |l| l.entropy),
        ("held-out pass rate (greedy)", |l| l.heldout_greedy),
    ];
    let width = panels.len() as f64 * (PANEL_W + MARGIN) + MARGIN;
    let height = PANEL_H + 2.5 * MARGIN + 20.0 * runs.len() as f64;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (pi, (title, f)) in panels.iter().enumerate() {
        let x0 = MARGIN + pi as f64 * (PANEL_W + MARGIN);
        let y0 = MARGIN;
        let values = runs
            .iter()
            .flat_map(|r| r.log.iter().map(f))
            .filter(|v| v.is_finite());
        let ymax = values.fold(0.0f64, f64::max).max(1e-9) * 1.05;
        let steps = runs.iter().map(|r| r.log.len()).max().unwrap_or(1).max(2) - 1;
        let px = |step: usize| x0 + PANEL_W * step as f64 / steps as f64;
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
            r#"<text x="{x0}" y="{}">0</text><text x="{}" y="{}" text-anchor="end">step {steps}</text>"#,
            y0 + PANEL_H + 15.0,
            x0 + PANEL_W,
            y0 + PANEL_H + 15.0
        );
        for (ri, r) in runs.iter().enumerate() {
            let points: Vec<String> = r
                .log
                .iter()
                .filter(|l| f(l).is_finite())
                .map(|l| format!("{:.1},{:.1}", px(l.step), py(f(l))))
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{}" stroke-width="1.5" points="{}"/>"#,
                COLORS[ri % COLORS.len()],
                points.join(" ")
            );
        }
    }
    for (ri, r) in runs.iter().enumerate() {
        let y = MARGIN + PANEL_H + 35.0 + 20.0 * ri as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{MARGIN}" y1="{y}" x2="{}" y2="{y}" stroke="{}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
            MARGIN + 30.0,
            COLORS[ri % COLORS.len()],
            MARGIN + 38.0,
            y + 4.0,
            r.method.name()
        );
    }
    s.push_str("</svg>\n");
    s
}
