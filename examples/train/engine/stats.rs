//! Summary statistics over seeds: the mean and a 95% confidence interval from Student's t.

/// Two-sided 97.5% quantiles of Student's t for 1..=30 degrees of freedom.
const T975: [f64; 30] = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
    2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
    2.052, 2.048, 2.045, 2.042,
];

/// Mean and the half-width of its 95% confidence interval (t over n − 1 degrees of freedom;
/// 0 for a single value). NaN values are left out (a metric a run does not have).
pub fn mean_ci(v: &[f64]) -> (f64, f64) {
    let v: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    let n = v.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mean = v.iter().sum::<f64>() / n as f64;
    if n == 1 {
        return (mean, 0.0);
    }
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let t = T975.get(n - 2).copied().unwrap_or(1.96);
    (mean, t * (var / n as f64).sqrt())
}

/// Unbiased pass@k from `c` correct among `n` samples (Chen et al. 2021): 1 − C(n−c, k)/C(n, k).
pub fn pass_at_k(n: usize, c: usize, k: usize) -> f64 {
    if n - c < k {
        return 1.0;
    }
    1.0 - (0..k)
        .map(|i| (n - c - i) as f64 / (n - i) as f64)
        .product::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pass_at_k_and_ci() {
        assert_eq!(pass_at_k(16, 0, 8), 0.0);
        assert_eq!(pass_at_k(16, 9, 8), 1.0);
        // One correct of 16: it is among 8 drawn without replacement with probability 1/2.
        assert!((pass_at_k(16, 1, 8) - 0.5).abs() < 1e-12);
        let (m, h) = mean_ci(&[1.0, 2.0, 3.0]);
        assert_eq!(m, 2.0);
        assert!((h - 4.303 / 3f64.sqrt()).abs() < 1e-12);
    }
}
