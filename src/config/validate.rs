//! Range checks on a [`Config`]: every error names the key.

use super::options::Aggregation;
use super::presets::Config;
use crate::error::{Error, Result};

impl Config {
    /// Range checks; every error names the key.
    pub fn validate(&self) -> Result<()> {
        let finite = |key: &str, v: f64| -> Result<()> {
            if v.is_finite() {
                Ok(())
            } else {
                Err(Error::config(key, format!("{v} is not finite")))
            }
        };
        for (k, v) in [
            ("alpha", self.alpha),
            ("lambda", self.lambda),
            ("clip_low", self.clip_low),
            ("clip_high", self.clip_high),
            ("dual_clip", self.dual_clip),
            ("adv_eps", self.adv_eps),
            ("correct_threshold", self.correct_threshold),
            ("entropy_coef", self.entropy_coef),
            ("kl_coef", self.kl_coef),
            ("luffy_gamma", self.luffy_gamma),
            ("clip_cov_ratio", self.clip_cov_ratio),
            ("clip_cov_lb", self.clip_cov_lb),
            ("clip_cov_ub", self.clip_cov_ub),
            ("kl_cov_ratio", self.kl_cov_ratio),
            ("kl_cov_coef", self.kl_cov_coef),
        ] {
            finite(k, v)?;
        }
        if !(0.0..=1.0).contains(&self.alpha) {
            return Err(Error::config(
                "alpha",
                format!("{} is outside [0, 1]", self.alpha),
            ));
        }
        if self.lambda < 0.0 {
            return Err(Error::config(
                "lambda",
                format!("{} is negative", self.lambda),
            ));
        }
        if !(0.0..1.0).contains(&self.clip_low) {
            return Err(Error::config(
                "clip_low",
                format!("{} is outside [0, 1)", self.clip_low),
            ));
        }
        if self.clip_high < 0.0 {
            return Err(Error::config(
                "clip_high",
                format!("{} is negative", self.clip_high),
            ));
        }
        if self.adv_eps <= 0.0 {
            return Err(Error::config(
                "adv_eps",
                format!("{} must be > 0", self.adv_eps),
            ));
        }
        if self.luffy_gamma <= 0.0 {
            return Err(Error::config(
                "luffy_gamma",
                format!("{} must be > 0", self.luffy_gamma),
            ));
        }
        if self.kl_cov_coef < 0.0 {
            return Err(Error::config(
                "kl_cov_coef",
                format!(
                    "{} is negative (β of KL-Cov's penalty β·|ℓ − ℓold| is >= 0)",
                    self.kl_cov_coef
                ),
            ));
        }
        for (k, r) in [
            ("clip_cov_ratio", self.clip_cov_ratio),
            ("kl_cov_ratio", self.kl_cov_ratio),
        ] {
            if !(r > 0.0 && r <= 1.0) {
                return Err(Error::config(k, format!("{r} is outside (0, 1]")));
            }
        }
        if self.clip_cov_lb >= self.clip_cov_ub {
            return Err(Error::config(
                "clip_cov_lb",
                format!(
                    "{} must be < clip_cov_ub ({})",
                    self.clip_cov_lb, self.clip_cov_ub
                ),
            ));
        }
        for (k, v) in [
            ("cov_adv_mean", self.cov_adv_mean),
            ("cov_logprob_mean", self.cov_logprob_mean),
        ] {
            match v {
                Some(x) if !x.is_finite() => {
                    return Err(Error::config(k, format!("{x} is not finite")))
                }
                Some(_) if self.cov_token_count.is_none() => {
                    return Err(Error::config(
                        "cov_token_count",
                        format!(
                        "is required when `{k}` is given (the global means need the global count)"
                    ),
                    ))
                }
                _ => {}
            }
        }
        if let Some(n) = self.cov_token_count {
            if !(n.is_finite() && n >= 0.0) {
                return Err(Error::config(
                    "cov_token_count",
                    format!("{n} must be finite and >= 0"),
                ));
            }
            if self.cov_adv_mean.is_none() || self.cov_logprob_mean.is_none() {
                return Err(Error::config(
                    "cov_token_count",
                    "is given without both `cov_adv_mean` and `cov_logprob_mean`",
                ));
            }
        }
        match (self.agg, self.t_norm) {
            (Aggregation::SeqMeanTokenSumNorm, None) => {
                return Err(Error::config(
                    "t_norm",
                    "is required when agg is \"seq-mean-token-sum-norm\"",
                ))
            }
            (_, Some(t)) if !(t.is_finite() && t > 0.0) => {
                return Err(Error::config(
                    "t_norm",
                    format!("{t} must be finite and > 0"),
                ))
            }
            _ => {}
        }
        Ok(())
    }
}
