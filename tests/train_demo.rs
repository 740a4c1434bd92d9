//! A shortened run of the training demo (examples/train): every method must beat the initial
//! policy on held-out prompts, a fixed seed must reproduce the run bit for bit, and the chain
//! fused forward → loss → fused backward → ∂L/∂W must match finite differences of the loss.

#[path = "../examples/train/engine/mod.rs"]
mod engine;

use engine::policy::Policy;
use engine::report;
use engine::rng::Rng;
use engine::task::Dataset;
use engine::trainer::{minibatch_loss, train, Method, Settings};

fn short() -> Settings {
    Settings {
        steps: 60,
        sft_steps: 6,
        eval_samples: 2,
        ..Settings::default()
    }
}

#[test]
fn every_method_improves_the_heldout_pass_rate() {
    let s = short();
    let data = Dataset::new(s.seed);
    let mut runs = Vec::new();
    for method in Method::ALL {
        let r = train(method, &s, &data);
        assert!(
            r.last.greedy > r.initial.greedy + 0.05,
            "{}: held-out greedy pass rate {} → {}",
            method.name(),
            r.initial.greedy,
            r.last.greedy
        );
        assert!(r.last.sampled > r.initial.sampled, "{}", method.name());
        runs.push(vec![r]);
    }
    // The report: one table row and one curve per panel for each method.
    let table = report::table(&runs);
    let svg = report::svg(&runs);
    for method in Method::ALL {
        assert_eq!(Method::parse(method.name()), Some(method));
        assert!(
            table.contains(&format!("| {:<8} |", method.name())),
            "{table}"
        );
        assert!(svg.contains(method.name()));
    }
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<polyline").count(), 3 * Method::ALL.len());
}

#[test]
fn a_fixed_seed_reproduces_the_run_bit_for_bit() {
    let s = Settings {
        steps: 20,
        seed: 7,
        ..short()
    };
    let data = Dataset::new(s.seed);
    for method in [Method::Calibrl, Method::Luffy] {
        let a = train(method, &s, &data);
        let b = train(method, &s, &data);
        // Display of f64 is the shortest exact representation: equal text = equal bits.
        assert_eq!(
            report::csv(&[vec![a.clone()]]),
            report::csv(&[vec![b.clone()]])
        );
        assert_eq!(report::table(&[vec![a]]), report::table(&[vec![b]]));
    }
}

#[test]
fn weight_gradient_matches_finite_differences() {
    let s = Settings::default();
    let data = Dataset::new(s.seed);
    let behaviour = Policy::base();
    // Evaluate away from the behaviour policy so ratios differ from 1 and Δ from 0 (no kinks).
    let mut policy = behaviour.clone();
    let mut rng = Rng::stream(99, 1);
    for w in &mut policy.w {
        *w += 0.05 * (rng.uniform() - 0.5);
    }
    // Not RL-PLUS: its sg(1 − e^ℓ)^½ factor is a stop-gradient, so by design its gradient is not
    // the derivative of its loss value.
    for method in [Method::Calibrl, Method::Grpo, Method::Luffy] {
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
                "{}: W[{k}] analytic {} vs finite difference {fd}",
                method.name(),
                grad[k]
            );
        }
    }
}
