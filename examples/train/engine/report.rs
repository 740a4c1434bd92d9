//! Output of a comparison: the results table (mean ± 95% CI over seeds), CSVs of every run's
//! evaluations and training curves, and SVG pictures written by hand (no plotting dependency):
//! one small panel per method and metric (so no curve hides another), the α / λ sweeps'
//! entropy curves, and a bar chart of OOD pass@1. Every curve carries its 95% CI band.

use super::stats::mean_ci;
use super::trainer::{Eval, RunResult};
use std::fmt::Write as _;

/// One arm of the comparison (a method with its settings) and its runs, one per seed.
#[derive(Clone, Debug)]
pub struct Arm {
    pub label: String,
    pub runs: Vec<RunResult>,
}

type Metric = fn(&Eval) -> f64;

/// The table's columns: header, value, decimals.
const COLUMNS: [(&str, Metric, usize); 7] = [
    ("ID pass@1", |e| e.id_pass1, 3),
    ("ID pass@8", |e| e.id_pass_k, 3),
    ("OOD pass@1", |e| e.ood_pass1, 3),
    ("distinct correct", |e| e.distinct, 2),
    ("entropy", |e| e.entropy, 3),
    ("mean Δ", |e| e.delta, 2),
    ("length", |e| e.length, 2),
];

fn final_values(arm: &Arm, f: Metric) -> Vec<f64> {
    arm.runs.iter().map(|r| f(r.last())).collect()
}

fn cell(arm: &Arm, f: Metric, digits: usize) -> String {
    let (m, h) = mean_ci(&final_values(arm, f));
    if m.is_nan() {
        "—".into()
    } else if arm.runs.len() > 1 {
        format!("{m:.digits$} ± {h:.digits$}")
    } else {
        format!("{m:.digits$}")
    }
}

/// Markdown table of the final evaluation (mean ± 95% CI half-width over seeds), then the
/// initial policy's values.
pub fn table(arms: &[Arm]) -> String {
    let width = arms
        .iter()
        .map(|a| a.label.chars().count())
        .max()
        .unwrap_or(6)
        .max(6);
    let mut s = format!("| {:<width$} |", "method");
    let mut rule = format!("|{}|", "-".repeat(width + 2));
    for (h, _, _) in COLUMNS {
        let _ = write!(s, " {h:<15} |");
        rule.push_str(&format!("{}|", "-".repeat(17)));
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "{rule}");
    for a in arms {
        let _ = write!(s, "| {:<width$} |", a.label);
        for (_, f, d) in COLUMNS {
            let _ = write!(s, " {:<15} |", cell(a, f, d));
        }
        let _ = writeln!(s);
    }
    if let Some(first) = arms.first() {
        let init = |f: Metric| {
            mean_ci(
                &first
                    .runs
                    .iter()
                    .map(|r| f(&r.evals[0]))
                    .collect::<Vec<_>>(),
            )
            .0
        };
        let ood = init(|e| e.ood_pass1);
        let ood = if ood.is_nan() {
            "—".into()
        } else {
            format!("{ood:.4}")
        };
        let _ = writeln!(
            s,
            "initial policy: ID pass@1 {:.4}, ID pass@8 {:.3}, OOD pass@1 {ood}, entropy {:.3}, mean Δ {:.2}",
            init(|e| e.id_pass1),
            init(|e| e.id_pass_k),
            init(|e| e.entropy),
            init(|e| e.delta)
        );
    }
    s
}

/// Each arm minus the first (GRPO), paired by seed (same prompts and sampling streams), at the
/// end: mean difference ± 95% CI. Tighter than comparing two independent intervals.
pub fn paired_table(arms: &[Arm]) -> String {
    let cols: [(&str, Metric, usize); 4] = [
        ("Δ ID pass@1", |e| e.id_pass1, 3),
        ("Δ OOD pass@1", |e| e.ood_pass1, 3),
        ("Δ distinct correct", |e| e.distinct, 2),
        ("Δ entropy", |e| e.entropy, 3),
    ];
    let Some(base) = arms.first() else {
        return String::new();
    };
    let width = arms
        .iter()
        .map(|a| a.label.chars().count())
        .max()
        .unwrap_or(6)
        + 9;
    let mut s = format!(
        "| {:<width$} |",
        "difference from ".to_string() + &base.label
    );
    let mut rule = format!("|{}|", "-".repeat(width + 2));
    for (h, _, _) in cols {
        let _ = write!(s, " {h:<18} |");
        rule.push_str(&format!("{}|", "-".repeat(20)));
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "{rule}");
    for a in &arms[1..] {
        let _ = write!(s, "| {:<width$} |", format!("{} − {}", a.label, base.label));
        for (_, f, d) in cols {
            let diffs: Vec<f64> = a
                .runs
                .iter()
                .zip(&base.runs)
                .map(|(x, y)| f(x.last()) - f(y.last()))
                .collect();
            let (m, h) = mean_ci(&diffs);
            let c = if m.is_nan() {
                "—".to_string()
            } else {
                format!("{m:+.d$} ± {h:.d$}")
            };
            let _ = write!(s, " {c:<18} |");
        }
        let _ = writeln!(s);
    }
    s
}

/// Every evaluation of every run.
pub fn evals_csv(arms: &[Arm]) -> String {
    let mut s = String::from(
        "arm,seed,step,id_pass1,id_pass_k,ood_pass1,distinct_correct,entropy,mean_delta,length\n",
    );
    for a in arms {
        for r in &a.runs {
            for e in &r.evals {
                let _ = writeln!(
                    s,
                    "{},{},{},{},{},{},{},{},{},{}",
                    a.label,
                    r.seed,
                    e.step,
                    e.id_pass1,
                    e.id_pass_k,
                    e.ood_pass1,
                    e.distinct,
                    e.entropy,
                    e.delta,
                    e.length
                );
            }
        }
    }
    s
}

/// Every training step of every run (rollouts of the step's prompts).
pub fn steps_csv(arms: &[Arm]) -> String {
    let mut s = String::from("arm,seed,step,reward,rollout_entropy,rollout_length\n");
    for a in arms {
        for r in &a.runs {
            for l in &r.log {
                let _ = writeln!(
                    s,
                    "{},{},{},{},{},{}",
                    a.label, r.seed, l.step, l.reward, l.entropy, l.length
                );
            }
        }
    }
    s
}

// ---- pictures -------------------------------------------------------------------------------

const COLORS: [&str; 8] = [
    "#4d4d4d", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
];
const PW: f64 = 230.0;
const PH: f64 = 130.0;
const LEFT: f64 = 60.0;
const GAP_X: f64 = 45.0;
const GAP_Y: f64 = 48.0;
const TOP: f64 = 50.0;

/// A "nice" tick step (1, 2, 2.5 or 5 × 10^k) giving about four intervals over [0, max].
fn tick_step(max: f64) -> f64 {
    let raw = (max / 4.0).max(1e-12);
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * mag)
}

/// Ticks 0, step, 2·step, … covering `max`, and the axis top.
fn ticks(max: f64) -> (Vec<f64>, f64) {
    let step = tick_step(max);
    let n = (max / step - 1e-9).ceil().max(1.0) as usize;
    ((0..=n).map(|i| i as f64 * step).collect(), n as f64 * step)
}

/// A tick label without trailing zeros (0.25, 0.5, 1, 150).
fn label(v: f64) -> String {
    let s = format!("{:.3}", v);
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Mean and CI band of one metric at each evaluation step over an arm's seeds.
fn band(arm: &Arm, f: Metric) -> Vec<(f64, f64, f64)> {
    let evals = arm.runs[0].evals.len();
    (0..evals)
        .map(|i| {
            let (m, h) = mean_ci(&arm.runs.iter().map(|r| f(&r.evals[i])).collect::<Vec<_>>());
            (arm.runs[0].evals[i].step as f64, m, h)
        })
        .collect()
}

struct Panel {
    x0: f64,
    y0: f64,
    xmax: f64,
    ymax: f64,
}

impl Panel {
    fn px(&self, x: f64) -> f64 {
        self.x0 + PW * x / self.xmax
    }
    fn py(&self, y: f64) -> f64 {
        self.y0 + PH * (1.0 - y.clamp(0.0, self.ymax) / self.ymax)
    }

    /// Frame, grid, tick labels on both axes, title.
    fn axes(&self, s: &mut String, title: &str, yticks: &[f64], xlabel: bool) {
        let (x0, y0) = (self.x0, self.y0);
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-weight="bold">{title}</text>"##,
            x0 + PW / 2.0,
            y0 - 8.0
        );
        for &v in yticks {
            let y = self.py(v);
            let _ = writeln!(
                s,
                r##"<line x1="{x0:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e3e3e3"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                x0 + PW,
                x0 - 5.0,
                y + 4.0,
                label(v)
            );
        }
        let (xt, _) = ticks(self.xmax);
        for &v in xt.iter().filter(|&&v| v <= self.xmax + 1e-9) {
            let x = self.px(v);
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="black"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                y0 + PH,
                y0 + PH + 4.0,
                y0 + PH + 16.0,
                label(v)
            );
        }
        if xlabel {
            let _ = writeln!(
                s,
                r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#555">training step</text>"##,
                x0 + PW / 2.0,
                y0 + PH + 30.0
            );
        }
        let _ = writeln!(
            s,
            r##"<rect x="{x0:.1}" y="{y0:.1}" width="{PW}" height="{PH}" fill="none" stroke="black"/>"##
        );
    }

    /// A mean curve with its CI band (the band omitted for a reference curve).
    fn curve(
        &self,
        s: &mut String,
        pts: &[(f64, f64, f64)],
        color: &str,
        dashed: bool,
        with_band: bool,
    ) {
        let pts: Vec<_> = pts.iter().filter(|p| p.1.is_finite()).collect();
        if pts.is_empty() {
            return;
        }
        if with_band {
            let upper: Vec<String> = pts
                .iter()
                .map(|&&(x, m, h)| format!("{:.1},{:.1}", self.px(x), self.py(m + h)))
                .collect();
            let lower: Vec<String> = pts
                .iter()
                .rev()
                .map(|&&(x, m, h)| format!("{:.1},{:.1}", self.px(x), self.py(m - h)))
                .collect();
            let _ = writeln!(
                s,
                r#"<polygon class="band" fill="{color}" fill-opacity="0.22" stroke="none" points="{} {}"/>"#,
                upper.join(" "),
                lower.join(" ")
            );
        }
        let line: Vec<String> = pts
            .iter()
            .map(|&&(x, m, _)| format!("{:.1},{:.1}", self.px(x), self.py(m)))
            .collect();
        let dash = if dashed {
            r#" stroke-dasharray="5,3""#
        } else {
            ""
        };
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="{}"{dash} points="{}"/>"#,
            if dashed { 1.2 } else { 2.0 },
            line.join(" ")
        );
    }
}

fn svg_open(s: &mut String, w: f64, h: f64) {
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0}" height="{h:.0}" viewBox="0 0 {w:.0} {h:.0}" font-family="DejaVu Sans, sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
}

fn max_of(arms: &[&Arm], f: Metric) -> f64 {
    arms.iter()
        .flat_map(|a| band(a, f))
        .map(|(_, m, h)| m + h)
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max)
}

/// Curves of the main comparison: one row per method, one column per metric (ID pass@1,
/// OOD pass@1, entropy), each with its 95% CI band; the first arm (GRPO) is repeated as a
/// dashed grey reference in the other rows.
pub fn curves_svg(arms: &[Arm], title: &str) -> String {
    let cols: Vec<(&str, Metric)> = vec![
        ("ID pass@1", |e| e.id_pass1),
        ("OOD pass@1", |e| e.ood_pass1),
        ("policy entropy (nats/token)", |e| e.entropy),
        ("distinct correct answers / prompt", |e| e.distinct),
    ];
    let cols: Vec<_> = cols
        .into_iter()
        .filter(|(_, f)| {
            arms.iter()
                .any(|a| a.runs.iter().any(|r| f(r.last()).is_finite()))
        })
        .collect();
    let all: Vec<&Arm> = arms.iter().collect();
    let xmax = arms[0].runs[0].last().step as f64;
    let w = LEFT + cols.len() as f64 * (PW + GAP_X) + 110.0;
    let h = TOP + arms.len() as f64 * (PH + GAP_Y) + 10.0;
    let mut s = String::new();
    svg_open(&mut s, w, h);
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="20" font-size="14" font-weight="bold">{title}</text>"#
    );
    for (ci, (name, f)) in cols.iter().enumerate() {
        let (yt, ymax) = if name.contains("pass") {
            (vec![0.0, 0.25, 0.5, 0.75, 1.0], 1.0)
        } else {
            ticks(max_of(&all, *f))
        };
        for (ri, arm) in arms.iter().enumerate() {
            let p = Panel {
                x0: LEFT + ci as f64 * (PW + GAP_X),
                y0: TOP + ri as f64 * (PH + GAP_Y),
                xmax,
                ymax,
            };
            p.axes(&mut s, name, &yt, ri + 1 == arms.len());
            if ri > 0 {
                p.curve(&mut s, &band(&arms[0], *f), "#9a9a9a", true, false);
            }
            p.curve(
                &mut s,
                &band(arm, *f),
                COLORS[ri % COLORS.len()],
                false,
                true,
            );
            if ci + 1 == cols.len() {
                let _ = writeln!(
                    s,
                    r#"<text x="{:.1}" y="{:.1}" font-weight="bold" fill="{}">{}</text>"#,
                    p.x0 + PW + 12.0,
                    p.y0 + PH / 2.0,
                    COLORS[ri % COLORS.len()],
                    arm.label
                );
                if ri > 0 {
                    let _ = writeln!(
                        s,
                        r##"<text x="{:.1}" y="{:.1}" fill="#777" font-size="10">dashed: {}</text>"##,
                        p.x0 + PW + 12.0,
                        p.y0 + PH / 2.0 + 15.0,
                        arms[0].label
                    );
                }
            }
        }
    }
    s.push_str("</svg>\n");
    s
}

/// Sweep panels side by side: for each group of arms, their entropy curves (and OOD pass@1
/// curves underneath) with CI bands and a legend; `reference` (GRPO) dashed grey.
pub fn sweep_svg(groups: &[(&str, Vec<(String, &Arm)>)], reference: Option<&Arm>) -> String {
    let rows: [(&str, Metric); 2] = [
        ("policy entropy (nats/token)", |e| e.entropy),
        ("OOD pass@1", |e| e.ood_pass1),
    ];
    let w = LEFT + groups.len() as f64 * (PW + 120.0) + 10.0;
    let h = TOP + rows.len() as f64 * (PH + GAP_Y) + 10.0;
    let mut s = String::new();
    svg_open(&mut s, w, h);
    for (ri, (name, f)) in rows.iter().enumerate() {
        let all: Vec<&Arm> = groups
            .iter()
            .flat_map(|g| g.1.iter().map(|a| a.1))
            .collect();
        let (yt, ymax) = if name.contains("pass") {
            (vec![0.0, 0.25, 0.5, 0.75, 1.0], 1.0)
        } else {
            ticks(max_of(&all, *f))
        };
        for (gi, (title, arms)) in groups.iter().enumerate() {
            let p = Panel {
                x0: LEFT + gi as f64 * (PW + 120.0),
                y0: TOP + ri as f64 * (PH + GAP_Y),
                xmax: arms[0].1.runs[0].last().step as f64,
                ymax,
            };
            p.axes(
                &mut s,
                &format!("{title}: {name}"),
                &yt,
                ri + 1 == rows.len(),
            );
            if let Some(r) = reference {
                p.curve(&mut s, &band(r, *f), "#9a9a9a", true, false);
                if ri == 0 {
                    let _ = writeln!(
                        s,
                        r##"<text x="{:.1}" y="{:.1}" fill="#777" font-size="10">dashed: {}</text>"##,
                        p.x0 + PW + 10.0,
                        p.y0 + 14.0 + 16.0 * arms.len() as f64,
                        r.label
                    );
                }
            }
            for (ai, (legend, a)) in arms.iter().enumerate() {
                p.curve(
                    &mut s,
                    &band(a, *f),
                    COLORS[(ai + 1) % COLORS.len()],
                    false,
                    true,
                );
                if ri == 0 {
                    let _ = writeln!(
                        s,
                        r#"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{c}" stroke-width="3"/><text x="{:.1}" y="{:.1}">{}</text>"#,
                        p.x0 + PW + 10.0,
                        p.y0 + 10.0 + 16.0 * ai as f64,
                        p.x0 + PW + 28.0,
                        p.y0 + 10.0 + 16.0 * ai as f64,
                        p.x0 + PW + 33.0,
                        p.y0 + 14.0 + 16.0 * ai as f64,
                        legend,
                        c = COLORS[(ai + 1) % COLORS.len()]
                    );
                }
            }
        }
    }
    s.push_str("</svg>\n");
    s
}

/// Bars of a final metric per arm with 95% CI whiskers and the value written above each bar.
pub fn bars_svg(arms: &[Arm], title: &str, f: Metric) -> String {
    let bw = 46.0;
    let gap = 22.0;
    let ph = 220.0;
    let (x0, y0) = (LEFT, TOP);
    let w = x0 + arms.len() as f64 * (bw + gap) + gap + 90.0;
    let h = y0 + ph + 90.0;
    let mut s = String::new();
    svg_open(&mut s, w, h);
    let _ = writeln!(
        s,
        r#"<text x="{x0}" y="22" font-size="14" font-weight="bold">{title}</text>"#
    );
    let py = |v: f64| y0 + ph * (1.0 - v.clamp(0.0, 1.0));
    for v in [0.0, 0.25, 0.5, 0.75, 1.0] {
        let _ = writeln!(
            s,
            r##"<line x1="{x0}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e3e3e3"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            w - 90.0,
            x0 - 5.0,
            py(v) + 4.0,
            label(v),
            y = py(v)
        );
    }
    for (i, a) in arms.iter().enumerate() {
        let (m, hw) = mean_ci(&final_values(a, f));
        let x = x0 + gap + i as f64 * (bw + gap);
        let c = COLORS[i % COLORS.len()];
        let m0 = if m.is_finite() { m } else { 0.0 };
        let _ = writeln!(
            s,
            r#"<rect x="{x:.1}" y="{:.1}" width="{bw}" height="{:.1}" fill="{c}" fill-opacity="0.8"/>"#,
            py(m0),
            py(0.0) - py(m0)
        );
        let cx = x + bw / 2.0;
        let _ = writeln!(
            s,
            r#"<line class="ci" x1="{cx:.1}" y1="{:.1}" x2="{cx:.1}" y2="{:.1}" stroke="black" stroke-width="1.5"/><line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="black"/><line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="black"/>"#,
            py(m0 + hw),
            py(m0 - hw),
            cx - 6.0,
            py(m0 + hw),
            cx + 6.0,
            py(m0 + hw),
            cx - 6.0,
            py(m0 - hw),
            cx + 6.0,
            py(m0 - hw)
        );
        let _ = writeln!(
            s,
            r#"<text x="{cx:.1}" y="{:.1}" text-anchor="middle" font-size="10">{m0:.2}</text>"#,
            py(m0 + hw) - 4.0
        );
        let _ = writeln!(
            s,
            r#"<text transform="translate({:.1},{:.1}) rotate(35)" font-size="11">{}</text>"#,
            cx - 4.0,
            y0 + ph + 14.0,
            a.label
        );
    }
    let _ = writeln!(
        s,
        r#"<rect x="{x0}" y="{y0}" width="{:.1}" height="{ph}" fill="none" stroke="black"/>"#,
        w - 90.0 - x0
    );
    s.push_str("</svg>\n");
    s
}
