//! JSON in and out: a `"preset"` key picks the starting point and the other keys override
//! fields; unknown keys, duplicate keys, wrong types and non-JSON values are errors naming the
//! key (with the nearest known key suggested).

use super::presets::Config;
use crate::error::{shorten, Error, Result};
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};

impl Config {
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
