//! The policy: a log-linear softmax over the vocabulary, `z = Wᵀ·φ(state)`, where φ is a sparse
//! binary feature vector of (prompt, position, previous token). Small enough to need no
//! deep-learning framework: the gradient of W is the outer product φ ⊗ ∂L/∂z, and ∂L/∂z comes
//! from the library's fused logits backward.

use super::rng::Rng;
use super::task::{Prompt, BASE, EOS, MAX_RESPONSE, VOCAB};

// Feature layout (indices into φ).
const BIAS: usize = 0;
/// On once every prompt digit has been consumed (t ≥ K): where EOS belongs.
const EXHAUSTED: usize = 1;
/// The prompt digit at the current step, d_t.
const DIGIT: usize = 2;
/// The previous token (BOS or a digit).
const PREV: usize = DIGIT + BASE;
/// The pair (previous token, d_t): enough to express s_t = s_{t-1} + d_t as a lookup.
const PAIR: usize = PREV + BASE + 1;
/// The previous token once the prompt is consumed (lets EOS depend on what came before).
const PREV_EXHAUSTED: usize = PAIR + (BASE + 1) * BASE;
const POSITION: usize = PREV_EXHAUSTED + BASE + 1;
pub const NUM_FEATURES: usize = POSITION + MAX_RESPONSE;
const BOS: usize = BASE;

/// Active features of the state "prompt, t tokens generated, last one `prev`" (None = BOS).
pub fn features(prompt: &[usize], t: usize, prev: Option<usize>) -> [usize; 5] {
    let prev = prev.unwrap_or(BOS);
    let (digit, pair) = match prompt.get(t) {
        Some(&d) => (DIGIT + d, PAIR + prev * BASE + d),
        None => (EXHAUSTED, PREV_EXHAUSTED + prev),
    };
    [BIAS, digit, PREV + prev, pair, POSITION + t]
}

#[derive(Clone, Debug)]
pub struct Policy {
    /// `[NUM_FEATURES, VOCAB]`, row-major.
    pub w: Vec<f64>,
}

impl Policy {
    /// The starting policy: uniform over digits, and a format prior (like a base model that
    /// knows to stop after the last step, but not the arithmetic): EOS is unlikely while prompt
    /// digits remain (≈1%) and likely once they are consumed (≈80%).
    pub fn base() -> Policy {
        let mut w = vec![0.0; NUM_FEATURES * VOCAB];
        w[BIAS * VOCAB + EOS] = -3.0;
        w[EXHAUSTED * VOCAB + EOS] = 6.0;
        Policy { w }
    }

    /// Logits of one state, written into `out[..VOCAB]` as f32 (the dtype the fused path reads).
    pub fn logits(&self, f: &[usize; 5], out: &mut [f32]) {
        let mut z = [0f64; VOCAB];
        for &i in f {
            for (v, zv) in z.iter_mut().enumerate() {
                *zv += self.w[i * VOCAB + v];
            }
        }
        for (o, zv) in out.iter_mut().zip(z) {
            *o = zv as f32;
        }
    }

    /// Accumulates ∂L/∂W += φ ⊗ ∂L/∂z for one state.
    pub fn accumulate(f: &[usize; 5], dz: &[f32], grad: &mut [f64]) {
        for &i in f {
            for (v, &d) in dz.iter().enumerate().take(VOCAB) {
                grad[i * VOCAB + v] += d as f64;
            }
        }
    }

    /// One response, sampled at temperature 1 (or greedy: argmax, first index on ties). This is
    /// the "inference engine" of the demo; the training computations go through the library.
    pub fn generate(&self, prompt: &Prompt, rng: Option<&mut Rng>) -> Vec<usize> {
        let mut rng = rng;
        let mut out = Vec::new();
        let mut z = [0f32; VOCAB];
        while out.len() < MAX_RESPONSE {
            self.logits(&features(prompt, out.len(), out.last().copied()), &mut z);
            let tok = match rng.as_deref_mut() {
                Some(r) => sample(&z, r),
                None => argmax(&z),
            };
            out.push(tok);
            if tok == EOS {
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
