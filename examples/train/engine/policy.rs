//! The policy: a log-linear softmax over the vocabulary, `z = Wᵀ·φ(state)`, where φ is a sparse
//! binary feature vector of the state (five active features, defined by the task). Small enough to need no
//! deep-learning framework: the gradient of W is the outer product φ ⊗ ∂L/∂z, and ∂L/∂z comes
//! from the library's fused logits backward.

use super::rng::Rng;
use super::task::{Prompt, Task};

/// Largest vocabulary of the tasks (logits live in a stack array of this size).
const MAX_VOCAB: usize = 8;

#[derive(Clone, Debug)]
pub struct Policy {
    pub task: Task,
    /// `[num_features, vocab]`, row-major.
    pub w: Vec<f64>,
}

impl Policy {
    /// The task's starting policy (its format prior; see the task modules).
    pub fn base(task: Task) -> Policy {
        debug_assert!(task.vocab() <= MAX_VOCAB);
        Policy {
            task,
            w: task.base_weights(),
        }
    }

    /// Logits of one state, written into `out[..vocab]` as f32 (the dtype the fused path reads).
    pub fn logits(&self, f: &[usize; 5], out: &mut [f32]) {
        let v = self.task.vocab();
        let mut z = [0f64; MAX_VOCAB];
        for &i in f {
            for (k, zv) in z[..v].iter_mut().enumerate() {
                *zv += self.w[i * v + k];
            }
        }
        for (o, zv) in out[..v].iter_mut().zip(z) {
            *o = zv as f32;
        }
    }

    /// Accumulates ∂L/∂W += φ ⊗ ∂L/∂z for one state (`dz` holds the vocabulary).
    pub fn accumulate(f: &[usize; 5], dz: &[f32], grad: &mut [f64]) {
        let v = dz.len();
        for &i in f {
            for (k, &d) in dz.iter().enumerate() {
                grad[i * v + k] += d as f64;
            }
        }
    }

    /// One response, sampled at temperature 1 (or greedy: argmax, first index on ties). This is
    /// the "inference engine" of the demo; the training computations go through the library.
    pub fn generate(&self, prompt: &Prompt, rng: Option<&mut Rng>) -> Vec<usize> {
        let (v, eos) = (self.task.vocab(), self.task.eos());
        let mut rng = rng;
        let mut out = Vec::new();
        let mut z = [0f32; MAX_VOCAB];
        while out.len() < self.task.max_response() {
            self.logits(&self.task.features(prompt, &out), &mut z);
            let tok = match rng.as_deref_mut() {
                Some(r) => sample(&z[..v], r),
                None => argmax(&z[..v]),
            };
            out.push(tok);
            if tok == eos {
                break;
            }
        }
        out
    }
}

fn argmax(z: &[f32]) -> usize {
    let mut best = 0;
    for (v, &x) in z.iter().enumerate() {
        if x > z[best] {
            best = v;
        }
    }
    best
}

fn sample(z: &[f32], rng: &mut Rng) -> usize {
    let m = z.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let p: Vec<f64> = z.iter().map(|&x| (x as f64 - m).exp()).collect();
    let mut u = rng.uniform() * p.iter().sum::<f64>();
    for (v, &pv) in p.iter().enumerate() {
        if u < pv {
            return v;
        }
        u -= pv;
    }
    z.len() - 1
}

/// Adam (Kingma & Ba), written out: the same optimiser and learning rate for every method.
pub struct Adam {
    lr: f64,
    m: Vec<f64>,
    v: Vec<f64>,
    t: i32,
}

impl Adam {
    const B1: f64 = 0.9;
    const B2: f64 = 0.999;
    const EPS: f64 = 1e-8;

    pub fn new(lr: f64, n: usize) -> Adam {
        Adam {
            lr,
            m: vec![0.0; n],
            v: vec![0.0; n],
            t: 0,
        }
    }

    pub fn step(&mut self, w: &mut [f64], grad: &[f64]) {
        self.t += 1;
        let c1 = 1.0 - Self::B1.powi(self.t);
        let c2 = 1.0 - Self::B2.powi(self.t);
        for k in 0..w.len() {
            self.m[k] = Self::B1 * self.m[k] + (1.0 - Self::B1) * grad[k];
            self.v[k] = Self::B2 * self.v[k] + (1.0 - Self::B2) * grad[k] * grad[k];
            w[k] -= self.lr * (self.m[k] / c1) / ((self.v[k] / c2).sqrt() + Self::EPS);
        }
    }
}
