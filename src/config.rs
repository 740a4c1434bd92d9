//! Configuration: every knob of SPEC.md §4–§5, the presets, and JSON parsing that names the
//! offending key for unknown keys, wrong types and out-of-range values.

use crate::error::{shorten, Error, Result};
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Which objective the loss computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossKind {
    /// Clipped PG on rollouts + λ·exploration term against the expert baseline.
    Calibrl,
    /// Clipped PG only (the exploration term is off whatever λ says).
    Grpo,
    /// Expert rows trained with the LUFFY off-policy term `−A·π/(π+γ)`.
    Luffy,
    /// Expert rows trained with the RL-PLUS off-policy term.
    Rlplus,
}

/// How Δ is formed (SPEC §4.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeltaMode {
    /// The paper: sequence log-prob sums, Δ_i = S_i − E_g.
    Sequence,
    /// The authors' code: per token, Δ[i,t] = ℓ[i,t] − ℓ*[g,t].
    TokenAligned,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    LeakyRelu,
    Relu,
    Tanh,
    Sigmoid,
    Huber,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Baseline {
    Expert,
    RefPolicy,
}

/// Token aggregation (SPEC §4.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Aggregation {
    #[serde(rename = "token-mean")]
    TokenMean,
    #[serde(rename = "seq-mean-token-sum")]
    SeqMeanTokenSum,
    #[serde(rename = "seq-mean-token-mean")]
    SeqMeanTokenMean,
    #[serde(rename = "seq-mean-token-sum-norm")]
    SeqMeanTokenSumNorm,
    #[serde(rename = "token-sum")]
    TokenSum,
}

/// Covariance-based entropy control (SPEC §4.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntropyControl {
    None,
    /// Zero p and ∂p/∂ℓ of a seeded random pick among unclipped tokens with lb < cov < ub.
    ClipCov,
    /// Add β·|ℓ − ℓold| to the unclipped p of the top-k tokens by cov.
    KlCov,
}

/// KL estimator (SPEC §4.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KlKind {
    #[serde(rename = "k1")]
    K1,
    #[serde(rename = "abs")]
    Abs,
    #[serde(rename = "k2", alias = "mse")]
    K2,
    #[serde(rename = "k3", alias = "low_var_kl")]
    K3,
}

/// The complete configuration. Field names are the JSON keys.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub loss: LossKind,
    pub delta_mode: DeltaMode,
    /// Divide S_i by n_i and E_g by n*_g (appendix C ablation).
    pub length_normalize: bool,
    pub activation: Activation,
    /// LeakyReLU negative slope α.
    pub alpha: f64,
    pub baseline: Baseline,
    /// w_i = |A_i| when on, 1 when off (Table 4 ablation).
    pub rarity_weighting: bool,
    /// λ, the exploration coefficient.
    pub lambda: f64,
    pub clip_low: f64,
    pub clip_high: f64,
    /// Dual-clip constant c; off when ≤ 1.
    pub dual_clip: f64,
    pub agg: Aggregation,
    /// The constant denominator of `seq-mean-token-sum-norm`.
    pub t_norm: Option<f64>,
    pub norm_by_std: bool,
    pub adv_eps: f64,
    /// τ: a rollout is correct when r > τ (unless correctness is given explicitly).
    pub correct_threshold: f64,
    /// β_H (the entropy bonus enters the loss as −β_H·L_H).
    pub entropy_coef: f64,
    /// β_KL.
    pub kl_coef: f64,
    pub kl_kind: KlKind,
    /// γ of LUFFY's f(π) = π/(π+γ).
    pub luffy_gamma: f64,
    /// SPEC §4.7 (preset `authors`): entropy, KL, the normalisers and the metrics take every
    /// row, expert rows included; a rollout without a selected expert explores against ℓ* = 0.
    pub authors_arithmetic: bool,
    /// SPEC §4.6.
    pub entropy_control: EntropyControl,
    pub clip_cov_ratio: f64,
    pub clip_cov_lb: f64,
    pub clip_cov_ub: f64,
    pub kl_cov_ratio: f64,
    pub kl_cov_coef: f64,
    /// Seed of Clip-Cov's random selection.
    pub cov_seed: u64,
    /// Caller-provided global means of A and ℓ and the global counted-token count (all ranks);
    /// null: this call's own.
    pub cov_adv_mean: Option<f64>,
    pub cov_logprob_mean: Option<f64>,
    pub cov_token_count: Option<f64>,
}

pub const PRESETS: [&str; 4] = ["paper", "reference", "grpo", "authors"];

impl Default for Config {
    fn default() -> Self {
        Config::preset("paper").expect("paper preset exists")
    }
}

impl Config {
    /// A named preset of SPEC §5.
    pub fn preset(name: &str) -> Result<Config> {
        let paper = Config {
            loss: LossKind::Calibrl,
            delta_mode: DeltaMode::Sequence,
            length_normalize: false,
            activation: Activation::LeakyRelu,
            alpha: 0.5,
            baseline: Baseline::Expert,
            rarity_weighting: true,
            lambda: 0.1,
            clip_low: 0.2,
            clip_high: 0.2,
            dual_clip: 3.0,
            agg: Aggregation::TokenMean,
            t_norm: None,
            norm_by_std: false,
            adv_eps: 1e-6,
            correct_threshold: 0.1,
            entropy_coef: 0.0,
            kl_coef: 0.0,
            kl_kind: KlKind::K3,
            luffy_gamma: 0.1,
            authors_arithmetic: false,
            entropy_control: EntropyControl::None,
            clip_cov_ratio: 2e-4,
            clip_cov_lb: 1.0,
            clip_cov_ub: 5.0,
            // verl 0.9.1 actor.yaml: policy_loss.kl_cov_ratio, policy_loss.ppo_kl_coef.
            kl_cov_ratio: 2e-4,
            kl_cov_coef: 0.1,
            cov_seed: 0,
            cov_adv_mean: None,
            cov_logprob_mean: None,
            cov_token_count: None,
        };
        match name {
            "paper" => Ok(paper),
            "reference" => Ok(Config {
                delta_mode: DeltaMode::TokenAligned,
                ..paper
            }),
            "grpo" => Ok(Config {
                loss: LossKind::Grpo,
                lambda: 0.0,
                ..paper
            }),
            "authors" => Ok(Config {
                delta_mode: DeltaMode::TokenAligned,
                authors_arithmetic: true,
                ..paper
            }),
            other => Err(Error::config(
                "preset",
                format!(
                    "unknown preset {other:?} (expected one of {})",
                    PRESETS.join(", ")
                ),
            )),
        }
    }

    /// Parses JSON: an object whose optional `"preset"` key picks the starting point (default
    /// `paper`) and whose other keys override fields. Errors name the key.
    pub fn from_json(text: &str) -> Result<Config> {
        let Entries(map) = serde_json::from_str(text).map_err(|e| {
            Error::new(
                crate::error::CalibrlStatus::InvalidConfig,
                format!("config JSON: {e}"),
            )
        })?;
        Config::from_map(map)
    }

    fn from_map(mut map: Map<String, Value>) -> Result<Config> {
        let preset = match map.remove("preset") {
            None => "paper".to_string(),
            Some(Value::String(s)) => s,
            Some(other) => {
                return Err(Error::config(
                    "preset",
                    format!("expected a string, got {}", shorten(&other.to_string())),
                ))
            }
        };
        let mut base = match serde_json::to_value(Config::preset(&preset)?) {
            Ok(Value::Object(m)) => m,
            _ => unreachable!("Config serialises to an object"),
        };
        for (key, value) in map {
            if !base.contains_key(&key) {
                let known: Vec<&str> = base.keys().map(|k| k.as_str()).collect();
                // Only a key of a known key's length can be a typo of it; this also bounds the
                // edit-distance work, whatever the key's length.
                let hint = closest_key(&key, &known)
                    .map(|k| format!("; did you mean {k:?}?"))
                    .unwrap_or_default();
                return Err(Error::config(
                    &key,
                    format!(
                        "unknown key{hint} (known keys: preset, {})",
                        known.join(", ")
                    ),
                ));
            }
            check_type(&key, &base[&key], &value)?;
            base.insert(key, value);
        }
        let cfg: Config = serde_json::from_value(Value::Object(base)).map_err(|e| {
            Error::new(
                crate::error::CalibrlStatus::InvalidConfig,
                format!("config: {e}"),
            )
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("Config serialises")
    }

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

    /// λ as it applies: zero unless the loss kind is CalibRL.
    pub fn effective_lambda(&self) -> f64 {
        if self.loss == LossKind::Calibrl {
            self.lambda
        } else {
            0.0
        }
    }

    pub fn trains_expert_rows(&self) -> bool {
        matches!(self.loss, LossKind::Luffy | LossKind::Rlplus)
    }

    /// SPEC §4.7 applies: the `authors` preset, unless LUFFY / RL-PLUS train the expert rows.
    pub fn authors(&self) -> bool {
        self.authors_arithmetic && !self.trains_expert_rows()
    }

    /// Whether the dual clip caps p for A < 0: never under Clip-Cov / KL-Cov (SPEC §4.6, as in
    /// verl), at any c_dual under the authors' arithmetic (§4.7), else when c_dual > 1 (§4.1).
    pub fn dual_clip_on(&self) -> bool {
        self.entropy_control == EntropyControl::None && (self.authors() || self.dual_clip > 1.0)
    }
}

/// The top-level JSON object, read so that a key given twice is an error (a plain map keeps the
/// last value silently) and a value that is no JSON (`NaN`) names its key.
struct Entries(Map<String, Value>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct ObjectVisitor;
        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = Entries;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object at the top level")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<Entries, A::Error> {
                let mut map = Map::new();
                while let Some(key) = m.next_key::<String>()? {
                    let value = m.next_value::<Value>().map_err(|e| {
                        de::Error::custom(format!(
                            "config key `{}`: its value is not valid JSON ({e}; NaN and \
                             Infinity are not JSON numbers)",
                            shorten(&key)
                        ))
                    })?;
                    if map.contains_key(&key) {
                        return Err(de::Error::custom(format!(
                            "config key `{}` is given twice",
                            shorten(&key)
                        )));
                    }
                    map.insert(key, value);
                }
                Ok(Entries(map))
            }
        }
        d.deserialize_map(ObjectVisitor)
    }
}

/// Rejects a value whose JSON type differs from the default's (so `"lambda": "0.1"` names the
/// key instead of a serde position).
fn check_type(key: &str, default: &Value, value: &Value) -> Result<()> {
    let ok = match default {
        Value::Bool(_) => value.is_boolean(),
        Value::Number(_) => value.is_number(),
        Value::String(_) => value.is_string(),
        // Option<f64> fields (t_norm) default to null.
        Value::Null => value.is_number() || value.is_null(),
        _ => true,
    };
    // cov_seed is a u64: say so here rather than through a serde position.
    let ok = ok && (key != "cov_seed" || value.is_u64());
    if !ok {
        let expected = match default {
            Value::Number(_) if key == "cov_seed" => "a non-negative integer",
            Value::Bool(_) => "a boolean",
            Value::Number(_) => "a number",
            Value::String(_) => "a string",
            _ => "a number or null",
        };
        return Err(Error::config(
            key,
            format!("expected {expected}, got {}", shorten(&value.to_string())),
        ));
    }
    if let Value::String(_) = default {
        // Check the enum value on its own, so the message names this key.
        let mut probe = serde_json::to_value(Config::default()).expect("serialises");
        probe[key] = value.clone();
        if let Err(e) = serde_json::from_value::<Config>(probe) {
            let msg = e.to_string();
            let msg = msg.split(" at line").next().unwrap_or(&msg).to_string();
            return Err(Error::config(key, msg));
        }
    }
    Ok(())
}

/// The known key a mistyped one most likely meant: the nearest by edit distance (case and a
/// trailing `_` ignored, as Python's `lambda_`), if it is close enough to be a typo.
fn closest_key<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    if key.len() > crate::error::QUOTE_MAX {
        return None; // no known key is that long: no typo of one
    }
    let key = key.to_ascii_lowercase();
    let key = key.trim_end_matches('_');
    known
        .iter()
        .map(|&k| (edit_distance(key, k), k))
        .filter(|&(d, k)| d <= (k.len().max(key.len()) / 3).max(1))
        .min_by_key(|&(d, _)| d)
        .map(|(_, k)| k)
}

/// Edit distance counting insertions, deletions, substitutions and swaps of neighbours (optimal
/// string alignment), by bytes.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    // d[i][j]: distance between a[..i] and b[..j].
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for j in 0..=b.len() {
        d[0][j] = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j - 1] + cost)
                .min(d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

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
