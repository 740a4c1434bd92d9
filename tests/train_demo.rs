//! A shortened run of the training demo (examples/train): every method must learn the default
//! task (`reach`), a fixed seed must reproduce the run bit for bit, and the chain fused forward
//! → loss → fused backward → ∂L/∂W must match finite differences of the loss.

#[path = "../examples/train/engine/mod.rs"]
mod engine;

use engine::policy::Policy;
use engine::report::{self, Arm};
use engine::rng::Rng;
use engine::task::Task;
use engine::trainer::{minibatch_loss, train, Method, Settings};

fn short() -> Settings {
    Settings {
        steps: 60,
        sft_steps: 6,
        eval_every: 20,
        eval_samples: 8,
        ..Settings::default()
    }
}

fn arm(r: engine::trainer::RunResult) -> Arm {
    Arm {
        label: r.method.name().to_string(),
        runs: vec![r],
    }
}

#[test]
fn every_method_learns_the_task() {
    let s = short();
    let data = s.task.dataset(s.seed);
    let mut arms = Vec::new();
    for method in Method::ALL {
        let r = train(method, &s, &data);
        let (first, last) = (&r.evals[0], r.last());
        // The base policy is right about 1% of the time in distribution.
        assert!(first.id_pass1 < 0.05, "{first:?}");
        assert!(
            last.id_pass1 > first.id_pass1 + 0.3,
            "{}: ID pass@1 {} → {}",
            method.name(),
            first.id_pass1,
            last.id_pass1
        );
        assert!(last.id_pass_k > last.id_pass1 - 1e-12, "{last:?}");
        assert!(last.distinct >= 1.0, "{last:?}");
        arms.push(arm(r));
    }
    // The report: one table row per method, and one CI band per curve panel.
    let table = report::table(&arms);
    for method in Method::ALL {
        assert_eq!(Method::parse(method.name()), Some(method));
        assert!(
            table.contains(&format!("| {:<8} ", method.name())),
            "{table}"
        );
    }
    let svg = report::curves_svg(&arms, "test");
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    // Four metrics per method, each with a band; GRPO's reference line in the other rows.
    assert_eq!(
        svg.matches(r#"class="band""#).count(),
        4 * Method::ALL.len()
    );
    assert!(!svg.contains("NaN"));
    let paired = report::paired_table(&arms);
    assert_eq!(
        paired.matches(" − grpo ").count(),
        Method::ALL.len() - 1,
        "{paired}"
    );
    let sweep = report::sweep_svg(
        &[("α", arms.iter().map(|a| (a.label.clone(), a)).collect())],
        Some(&arms[0]),
    );
    // Entropy and OOD pass@1 panels, one band per arm in each.
    assert_eq!(
        sweep.matches(r#"class="band""#).count(),
        2 * Method::ALL.len()
    );
    let bars = report::bars_svg(&arms, "OOD", |e| e.ood_pass1);
    assert_eq!(bars.matches(r#"class="ci""#).count(), Method::ALL.len());
    assert!(!report::evals_csv(&arms).contains("NaN"));
}

#[test]
fn a_fixed_seed_reproduces_the_run_bit_for_bit() {
    for task in [Task::Reach, Task::Sums] {
        assert_eq!(Task::parse(task.name()), Some(task));
        assert!(task
            .describe()
            .starts_with(&format!("task {}", task.name())));
        let s = Settings {
            task,
            steps: 20,
            seed: 7,
            ..short()
        };
        let data = s.task.dataset(s.seed);
        for method in Method::ALL {
            let a = vec![arm(train(method, &s, &data))];
            let b = vec![arm(train(method, &s, &data))];
            // Display of f64 is the shortest exact representation: equal text = equal bits.
            assert_eq!(report::evals_csv(&a), report::evals_csv(&b));
            assert_eq!(report::steps_csv(&a), report::steps_csv(&b));
        }
    }
}

#[test]
fn weight_gradient_matches_finite_differences() {
    for task in [Task::Reach, Task::Sums] {
        let s = Settings {
            task,
            ..Settings::default()
        };
        let data = s.task.dataset(s.seed);
        let behaviour = Policy::base(task);
        // Evaluate away from the behaviour policy so ratios differ from 1 and Δ from 0 (no kinks).
        let mut policy = behaviour.clone();
        let mut rng = Rng::stream(99, 1);
        for w in &mut policy.w {
            *w += 0.05 * (rng.uniform() - 0.5);
        }
        // Not RL-PLUS: its sg(1 − e^ℓ)^½ factor is a stop-gradient, so by design its gradient is
        // not the derivative of its loss value.
        for method in [
            Method::Calibrl,
            Method::Grpo,
            Method::Entropy,
            Method::Luffy,
        ] {
            let (_, grad) = minibatch_loss(method, &s, &data, &behaviour, &policy, 0);
            let gmax = grad.iter().fold(0.0f64, |a, g| a.max(g.abs()));
            assert!(gmax > 1e-4, "{}: gradient is zero", method.name());
            // The coordinates with the largest gradients, and a few others.
            let mut idx: Vec<usize> = (0..grad.len()).collect();
            idx.sort_by(|&a, &b| grad[b].abs().total_cmp(&grad[a].abs()));
            idx.truncate(6);
            idx.extend([3, 40, 101, 200]);
            let h = 1e-3;
            for k in idx {
                let mut plus = policy.clone();
                plus.w[k] += h;
                let mut minus = policy.clone();
                minus.w[k] -= h;
                let lp = minibatch_loss(method, &s, &data, &behaviour, &plus, 0).0;
                let lm = minibatch_loss(method, &s, &data, &behaviour, &minus, 0).0;
                let fd = (lp - lm) / (2.0 * h);
                assert!(
                    (fd - grad[k]).abs() <= 1e-3 * gmax + 1e-5,
                    "{:?} {}: W[{k}] analytic {} vs finite difference {fd}",
                    task,
                    method.name(),
                    grad[k]
                );
            }
        }
    }
}
