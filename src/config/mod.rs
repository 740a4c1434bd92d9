//! Configuration: every knob of SPEC.md §4–§5, the presets, and JSON parsing that names the
//! offending key for unknown keys, wrong types and out-of-range values.
//!
//! `options` holds the enumerated choices, `presets` the [`Config`] struct and SPEC §5's
//! presets, `validate` the range checks and `json` the parsing.

mod json;
mod options;
mod presets;
mod validate;

pub use options::{Activation, Aggregation, Baseline, DeltaMode, EntropyControl, KlKind, LossKind};
pub use presets::{Config, PRESETS};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_match_spec_table() {
        let p = Config::preset("paper").unwrap();
        assert_eq!(p.delta_mode, DeltaMode::Sequence);
        assert_eq!(
            (p.alpha, p.lambda, p.dual_clip, p.correct_threshold),
            (0.5, 0.1, 3.0, 0.1)
        );
        assert!(!p.norm_by_std);
        let r = Config::preset("reference").unwrap();
        assert_eq!(r.delta_mode, DeltaMode::TokenAligned);
        assert_eq!(r.agg, Aggregation::TokenMean);
        let g = Config::preset("grpo").unwrap();
        assert_eq!((g.loss, g.lambda), (LossKind::Grpo, 0.0));
        let a = Config::preset("authors").unwrap();
        assert_eq!(a.delta_mode, DeltaMode::TokenAligned);
        assert!(a.authors_arithmetic && !r.authors_arithmetic);
    }

    #[test]
    fn json_overrides_and_round_trip() {
        let c = Config::from_json(r#"{"preset":"reference","lambda":0.3,"kl_kind":"low_var_kl"}"#)
            .unwrap();
        assert_eq!(c.lambda, 0.3);
        assert_eq!(c.kl_kind, KlKind::K3);
        assert_eq!(c.delta_mode, DeltaMode::TokenAligned);
        assert_eq!(Config::from_json(&c.to_json()).unwrap(), c);
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (r#"{"lamda":0.1}"#, "`lamda`"),
            (r#"{"lambda":"0.1"}"#, "`lambda`"),
            (r#"{"alpha":1.5}"#, "`alpha`"),
            (r#"{"activation":"gelu"}"#, "`activation`"),
            (r#"{"agg":"seq-mean-token-sum-norm"}"#, "`t_norm`"),
            (r#"{"preset":"ppo"}"#, "`preset`"),
            (r#"{"clip_low":-0.1}"#, "`clip_low`"),
            (r#"{"clip_cov_ratio":0}"#, "`clip_cov_ratio`"),
            (r#"{"kl_cov_ratio":1.5}"#, "`kl_cov_ratio`"),
            (r#"{"clip_cov_lb":5,"clip_cov_ub":5}"#, "`clip_cov_lb`"),
            (
                r#"{"cov_adv_mean":0.1,"cov_logprob_mean":-1}"#,
                "`cov_token_count`",
            ),
            (r#"{"cov_token_count":10}"#, "`cov_token_count`"),
            (r#"{"entropy_control":"clipcov"}"#, "`entropy_control`"),
            (r#"{"kl_cov_coef":-1}"#, "`kl_cov_coef`"),
            (
                r#"{"lambda":0.1,"alpha":0.3,"lambda":0.2}"#,
                "`lambda` is given twice",
            ),
            (r#"{"lambda": NaN}"#, "`lambda`"),
            (r#"{"alpha": 0.3, "lambda": Infinity}"#, "`lambda`"),
        ];
        for (json, key) in cases {
            let e = Config::from_json(json).unwrap_err();
            assert_eq!(
                e.status,
                crate::error::CalibrlStatus::InvalidConfig,
                "{json}"
            );
            assert!(e.message.contains(key), "{json}: {}", e.message);
        }
        assert!(Config::from_json("[1]").is_err());
        assert!(Config::from_json("{").is_err());
    }

    #[test]
    fn unknown_keys_suggest_the_nearest_known_key() {
        for (json, hint) in [
            (r#"{"lamda":0.1}"#, r#"did you mean "lambda"?"#),
            (r#"{"lambda_":0.1}"#, r#"did you mean "lambda"?"#),
            (r#"{"Alpha":0.3}"#, r#"did you mean "alpha"?"#),
            (r#"{"alhpa":0.3}"#, r#"did you mean "alpha"?"#),
            (
                r#"{"entropy_coeff":0.1}"#,
                r#"did you mean "entropy_coef"?"#,
            ),
        ] {
            let e = Config::from_json(json).unwrap_err();
            assert!(e.message.contains(hint), "{json}: {}", e.message);
            assert!(e.message.contains("known keys: preset, "), "{}", e.message);
        }
        // Nothing close: no guess, only the list.
        let e = Config::from_json(r#"{"learning_rate":0.1}"#).unwrap_err();
        assert!(!e.message.contains("did you mean"), "{}", e.message);
    }
}
