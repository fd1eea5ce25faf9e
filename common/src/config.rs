//! Configuration loading: a TOML file overlaid with `PREFIX_*` environment
//! variables, deserialized strictly.
//!
//! Every config struct denies unknown keys, so a typo fails loudly instead of
//! being ignored. Errors name the file (or the environment variable) and the
//! key, because "invalid config" alone sends an operator hunting.
//!
//! Environment overrides: `PREFIX_KEY=value` sets top-level `key`; a double
//! underscore descends into a table, so `CUTOVER_SERVER_TLS__CA_CERT` sets
//! `tls.ca_cert`. A value that parses as a TOML value (number, boolean, array,
//! inline table) is taken as that; anything else is taken as a string.
//! `PREFIX_CONFIG` is not a key: it names the config file itself.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {}", .path.display(), crate::fsutil::explain_io(.path, .source))]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{origin}: key `{key}`: {message}")]
    Invalid {
        origin: String,
        key: String,
        message: String,
    },
}

/// Loads `T` from `path` (when given) with overrides from environment
/// variables that start with `env_prefix` (e.g. `CUTOVER_AGENT_`).
pub fn load<T: DeserializeOwned>(path: Option<&Path>, env_prefix: &str) -> Result<T, ConfigError> {
    load_from(path, env_prefix, std::env::vars())
}

/// [`load`] with the environment passed in, so tests need not mutate the
/// process environment.
pub fn load_from<T: DeserializeOwned>(
    path: Option<&Path>,
    env_prefix: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<T, ConfigError> {
    let origin_file = path.map(|p| format!("config file {}", p.display()));
    let mut table = match path {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            toml::from_str::<toml::Table>(&text).map_err(|e| ConfigError::Syntax {
                path: path.to_path_buf(),
                message: e.to_string().trim().to_string(),
            })?
        }
        None => toml::Table::new(),
    };

    // Which key each override set (variable name, segments, raw value), so an
    // error in it blames the variable.
    let mut env_keys: BTreeMap<String, (String, Vec<String>, String)> = BTreeMap::new();
    for (name, raw) in env {
        let Some(rest) = name.strip_prefix(env_prefix) else {
            continue;
        };
        if rest.is_empty() || rest == "CONFIG" {
            continue;
        }
        let segments: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
        set_path(&mut table, &segments, parse_env_value(&raw)).map_err(|message| {
            ConfigError::Invalid {
                origin: format!("environment variable {name}"),
                key: segments.join("."),
                message,
            }
        })?;
        env_keys.insert(segments.join("."), (name, segments, raw));
    }

    // A variable's value is typed by TOML rules, but `NAME=42` or a label
    // `RACK=12` mean strings: when a variable's typed value is the wrong type
    // for its key, it is retried once as the plain string it was.
    let mut retried = std::collections::BTreeSet::new();
    loop {
        let error = match serde_path_to_error::deserialize(toml::Value::Table(table.clone())) {
            Ok(config) => return Ok(config),
            Err(error) => error,
        };
        let key = error.path().to_string();
        // toml appends "in `table`" on a second line; the key already says it.
        let message = error
            .inner()
            .to_string()
            .lines()
            .next()
            .unwrap_or_default()
            .to_string();
        if let Some((_, segments, raw)) = env_keys.get(&key) {
            if message.starts_with("invalid type") && retried.insert(key.clone()) {
                set_path(&mut table, segments, toml::Value::String(raw.clone()))
                    .expect("path was set before");
                continue;
            }
        }
        // At the top level an unknown field's path is "."; name the field.
        let key = match unknown_field(&message) {
            Some(field) if key == "." => field.to_string(),
            _ => key,
        };
        let origin = env_keys
            .get(&key)
            .map(|(var, _, _)| format!("environment variable {var}"))
            .or(origin_file)
            .unwrap_or_else(|| "configuration".to_string());
        return Err(ConfigError::Invalid {
            origin,
            key,
            message,
        });
    }
}

fn unknown_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split('`').next()
}

fn parse_env_value(raw: &str) -> toml::Value {
    match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut table) => table.remove("v").unwrap_or_else(|| raw.into()),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

fn set_path(
    table: &mut toml::Table,
    segments: &[String],
    value: toml::Value,
) -> Result<(), String> {
    let (last, parents) = segments.split_last().expect("at least one segment");
    let mut current = table;
    for segment in parents {
        let entry = current
            .entry(segment.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = entry
            .as_table_mut()
            .ok_or_else(|| format!("`{segment}` is not a table, cannot set a key inside it"))?;
    }
    current.insert(last.clone(), value);
    Ok(())
}

/// A byte size in config: a plain number of bytes or a string like "4MiB".
pub mod byte_size {
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(usize),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(n),
            Raw::Text(text) => parse(&text).map_err(serde::de::Error::custom),
        }
    }

    pub fn parse(text: &str) -> Result<usize, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let number: usize = number.parse().map_err(|_| {
            format!("invalid size {text:?}: expected e.g. 4194304, \"512KiB\" or \"4MiB\"")
        })?;
        let factor = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            other => {
                return Err(format!(
                    "invalid size unit {other:?} in {text:?}: use B, KiB, MiB or GiB"
                ))
            }
        };
        number
            .checked_mul(factor)
            .ok_or_else(|| format!("size {text:?} is too large"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::time::Duration;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        name: String,
        #[serde(with = "humantime_serde", default)]
        interval: Option<Duration>,
        #[serde(default)]
        tls: SampleTls,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct SampleTls {
        cert: Option<String>,
    }

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sample.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn env_overrides_file_and_descends_into_tables() {
        let (_dir, path) = write("name = \"a\"\ninterval = \"5s\"\n");
        let env = vec![
            ("X_NAME".to_string(), "b".to_string()),
            ("X_TLS__CERT".to_string(), "/c.pem".to_string()),
            ("OTHER".to_string(), "ignored".to_string()),
            ("X_CONFIG".to_string(), "/etc/x.toml".to_string()),
        ];
        let sample: Sample = load_from(Some(&path), "X_", env).unwrap();
        assert_eq!(sample.name, "b");
        assert_eq!(sample.interval, Some(Duration::from_secs(5)));
        assert_eq!(sample.tls.cert.as_deref(), Some("/c.pem"));

        // A number or boolean given for a string key stays the string it was.
        let env = vec![
            ("X_NAME".to_string(), "42".to_string()),
            ("X_TLS__CERT".to_string(), "true".to_string()),
        ];
        let sample: Sample = load_from(Some(&path), "X_", env).unwrap();
        assert_eq!(sample.name, "42");
        assert_eq!(sample.tls.cert.as_deref(), Some("true"));
    }

    #[test]
    fn unknown_key_names_key_and_file() {
        let (_dir, path) = write("name = \"a\"\n[tls]\ncert = \"x\"\nkey_file = \"y\"\n");
        let err = load_from::<Sample>(Some(&path), "X_", vec![]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("key `tls.key_file`: unknown field"), "{text}");
        assert!(text.contains(&path.display().to_string()), "{text}");
    }

    #[test]
    fn bad_value_names_key_and_origin() {
        let (_dir, path) = write("name = \"a\"\ninterval = \"soon\"\n");
        let err = load_from::<Sample>(Some(&path), "X_", vec![]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("`interval`"), "{text}");
        assert!(text.contains("sample.toml"), "{text}");

        let env = vec![("X_INTERVAL".to_string(), "later".to_string())];
        let err = load_from::<Sample>(Some(&path), "X_", env).unwrap_err();
        assert!(
            err.to_string().contains("environment variable X_INTERVAL"),
            "{err}"
        );
    }

    #[test]
    fn byte_sizes_parse() {
        assert_eq!(byte_size::parse("4MiB").unwrap(), 4 << 20);
        assert_eq!(byte_size::parse("512").unwrap(), 512);
        assert!(byte_size::parse("4MB").is_err());
    }
}
