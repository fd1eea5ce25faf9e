//! The validation rules a release must pass, held once: the coordinator
//! applies them when it reads a spec or a secret, the agent when it reads a
//! release off the wire, so a node never refuses what a deploy accepted.
//!
//! Each rule returns a [`RuleError`] whose message names the input, what is
//! wrong with it and what to do instead; callers put their own context
//! (the spec key, the check) in front.

/// Names of apps, services, environments, nodes and operators, and label
/// keys: at most this many characters (a DNS label's length).
pub const NAME_MAX: usize = 63;
/// Version labels: at most this many characters.
pub const VERSION_MAX: usize = 64;
/// Environment variable and secret names: at most this many characters.
pub const ENV_NAME_MAX: usize = 128;
/// Release ids (`SERVICE-VERSION-HASH`, the hash 8 hex digits): long enough
/// for the longest service name and version label.
pub const RELEASE_ID_MAX: usize = NAME_MAX + 1 + VERSION_MAX + 1 + 8;
/// Label values: at most this many bytes.
pub const LABEL_VALUE_MAX: usize = 253;
/// The statuses a health check's HTTP probe accepts when the spec names
/// none; also what a probe on the wire without a status means.
pub const DEFAULT_HEALTH_STATUS: (u16, u16) = (200, 399);
/// The statuses a smoke check accepts when the spec names none.
pub const DEFAULT_SMOKE_STATUS: (u16, u16) = (200, 200);

/// An input a rule refuses, with why and what to do instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RuleError {
    pub message: String,
}

impl RuleError {
    fn new(message: String) -> Self {
        Self { message }
    }
}

fn safe_label(text: &str, max: usize) -> bool {
    !text.is_empty()
        && text.len() <= max
        && text.starts_with(|c: char| c.is_ascii_alphanumeric())
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Whether `text` is a valid name (app, service, environment, node,
/// operator, label key): 1 to 63 characters from `a-z A-Z 0-9 . _ -`,
/// starting with a letter or digit; safe in file names, URIs and labels.
pub fn is_name(text: &str) -> bool {
    safe_label(text, NAME_MAX)
}

/// [`is_name`], as an error naming the input.
pub fn name(text: &str) -> Result<(), RuleError> {
    if is_name(text) {
        Ok(())
    } else {
        Err(RuleError::new(format!(
            "{text:?} is not a valid name: use 1 to {NAME_MAX} characters from a-z, A-Z, 0-9, '.', '_', '-', starting with a letter or digit, e.g. \"web-1\""
        )))
    }
}

/// A version label: 1 to 64 characters from `a-z A-Z 0-9 . _ -`, starting
/// with a letter or digit.
pub fn version(text: &str) -> Result<(), RuleError> {
    if safe_label(text, VERSION_MAX) {
        Ok(())
    } else {
        Err(RuleError::new(format!(
            "version {text:?} is not a version label: use 1 to {VERSION_MAX} characters from a-z, A-Z, 0-9, '.', '_', '-', starting with a letter or digit, e.g. \"2026.11.26-1\""
        )))
    }
}

/// A release id names a directory on the node: 1 to [`RELEASE_ID_MAX`]
/// characters from `a-z A-Z 0-9 . _ -`, not starting with '.'.
pub fn release_id(text: &str) -> Result<(), RuleError> {
    let ok = !text.is_empty()
        && text.len() <= RELEASE_ID_MAX
        && !text.starts_with('.')
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(RuleError::new(format!(
            "release id {text:?} is not one: release ids are 1 to {RELEASE_ID_MAX} characters from a-z, A-Z, 0-9, '.', '_', '-', not starting with '.'; deploy the release again from the coordinator"
        )))
    }
}

/// An environment variable name, which is also what a secret's name must
/// be (a release gets each secret as the variable of that name): 1 to 128
/// letters, digits and '_', not starting with a digit.
pub fn env_var_name(text: &str) -> Result<(), RuleError> {
    let ok = !text.is_empty()
        && text.len() <= ENV_NAME_MAX
        && !text.starts_with(|c: char| c.is_ascii_digit())
        && text.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(RuleError::new(format!(
            "{text:?} is not an environment variable name: use 1 to {ENV_NAME_MAX} letters, digits and '_', not starting with a digit, e.g. \"DB_PASSWORD\""
        )))
    }
}

/// A label (a node's, or a selector's): the key a [`name`], the value at
/// most 253 bytes with no control characters.
pub fn label(key: &str, value: &str) -> Result<(), RuleError> {
    if !is_name(key) {
        return Err(RuleError::new(format!(
            "label key {key:?} is not a valid name: use 1 to {NAME_MAX} characters from a-z, A-Z, 0-9, '.', '_', '-', starting with a letter or digit, e.g. \"role\""
        )));
    }
    if value.len() > LABEL_VALUE_MAX || value.chars().any(char::is_control) {
        return Err(RuleError::new(format!(
            "label {key}: the value {value:?} is not a label value: use at most {LABEL_VALUE_MAX} bytes of printable characters"
        )));
    }
    Ok(())
}

/// The signals a release may be asked to stop with, by name and by Linux
/// number (release images are Linux images, whatever the coordinator runs
/// on).
const STOP_SIGNALS: &[(&str, i32)] = &[
    ("SIGTERM", 15),
    ("SIGINT", 2),
    ("SIGQUIT", 3),
    ("SIGHUP", 1),
    ("SIGUSR1", 10),
    ("SIGUSR2", 12),
    ("SIGWINCH", 28),
    ("SIGKILL", 9),
];

/// A stop signal as a spec or an image's `STOPSIGNAL` spells it —
/// "SIGQUIT", "QUIT", "quit" or its Linux number "3" — as its canonical
/// name ("SIGQUIT"), the spelling on the wire and in the agent's records.
/// Only the signals that ask a process to stop (or kill it) are accepted.
pub fn stop_signal(text: &str) -> Result<&'static str, RuleError> {
    let trimmed = text.trim();
    let found = match trimmed.parse::<i32>() {
        Ok(number) => STOP_SIGNALS.iter().find(|(_, n)| *n == number),
        Err(_) => {
            let upper = trimmed.to_ascii_uppercase();
            let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
            STOP_SIGNALS.iter().find(|(name, _)| name[3..] == *bare)
        }
    };
    found.map(|(name, _)| *name).ok_or_else(|| {
        RuleError::new(format!(
            "{text:?} is not a stop signal: use one of {} (also spelled without SIG, in lowercase or by number, e.g. \"quit\" or \"3\")",
            STOP_SIGNALS
                .iter()
                .map(|(name, _)| *name)
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })
}

/// One HTTP status code a check may expect: 100 to 599.
pub fn status_code(code: i64) -> Result<u16, RuleError> {
    u16::try_from(code)
        .ok()
        .filter(|c| (100..=599).contains(c))
        .ok_or_else(|| {
            RuleError::new(format!(
                "{code} is not a status: use a code from 100 to 599 like 200 or a range like \"200-299\""
            ))
        })
}

/// An expected status as a spec writes it: a code ("200") or an inclusive
/// range ("200-299"), as (min, max).
pub fn parse_status(text: &str) -> Result<(u16, u16), RuleError> {
    let invalid = || {
        RuleError::new(format!(
            "{text:?} is not a status: use a code from 100 to 599 like 200 or a range like \"200-299\""
        ))
    };
    let code = |part: &str| {
        part.trim()
            .parse::<i64>()
            .ok()
            .and_then(|n| status_code(n).ok())
            .ok_or_else(invalid)
    };
    let (min, max) = match text.split_once('-') {
        Some((a, b)) => (code(a)?, code(b)?),
        None => {
            let c = code(text)?;
            (c, c)
        }
    };
    status_range(min.into(), max.into(), DEFAULT_HEALTH_STATUS)
        .map_err(|_| invalid())
        .map(|range| (range.0, range.1))
}

/// An expected status range as the wire carries it: both zero means
/// `default`, a zero max means exactly `min`. Codes are 100 to 599, the
/// range not reversed.
pub fn status_range(min: u32, max: u32, default: (u16, u16)) -> Result<(u16, u16), RuleError> {
    let (min, max) = match (min, max) {
        (0, 0) => return Ok(default),
        (min, 0) => (min, min),
        (min, max) => (min, max),
    };
    let min = status_code(min.into())?;
    let max = status_code(max.into())?;
    if min > max {
        return Err(RuleError::new(format!(
            "status range {min}-{max} is reversed: write the lower code first, e.g. \"{max}-{min}\""
        )));
    }
    Ok((min, max))
}

/// Exec checks run a command on the node: a release in a container has
/// none of its files or programs there, so its checks must be HTTP or TCP.
pub fn exec_check(in_container: bool) -> Result<(), RuleError> {
    if in_container {
        Err(RuleError::new(
            "exec checks run on the node, not in the container: give a docker release an HTTP (`path`) or TCP (`tcp = true`) check, or for a worker only `min_healthy_time`".into(),
        ))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["web", "web-01", "shop", "a.b_c-d", "0day", &"a".repeat(63)] {
            assert!(name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-web",
            ".web",
            "_web",
            "web/1",
            "web 1",
            "wéb",
            &"a".repeat(64),
        ] {
            let e = name(bad).unwrap_err();
            assert!(e.message.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn versions() {
        for ok in ["v1", "2026.11.26-1", "1.2.3_rc", &"1".repeat(64)] {
            assert!(version(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-1", "v/1", "v 1", &"1".repeat(65)] {
            let e = version(bad).unwrap_err();
            assert!(e.message.starts_with("version "), "{e}");
        }
    }

    #[test]
    fn release_ids_fit_the_longest_service_and_version() {
        let longest = format!("{}-{}-0123abcd", "s".repeat(63), "v".repeat(64));
        assert!(release_id(&longest).is_ok());
        assert!(release_id("web-v1-0123abcd").is_ok());
        assert!(release_id("_x").is_ok());
        for bad in ["", ".hidden", "..", "a/b", &format!("{longest}x")] {
            assert!(release_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn env_var_and_secret_names() {
        for ok in ["APP_KEY", "DB_PASSWORD", "_x", "a1", &"A".repeat(128)] {
            assert!(env_var_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1X",
            "DB-PASSWORD",
            "../x",
            "A B",
            "A=B",
            &"A".repeat(129),
        ] {
            let e = env_var_name(bad).unwrap_err();
            assert!(e.message.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn labels() {
        assert!(label("role", "web").is_ok());
        assert!(label("env", "").is_ok());
        assert!(label("zone", &"z".repeat(253)).is_ok());
        assert!(label("-role", "web").is_err());
        assert!(label("role", &"z".repeat(254)).is_err());
        assert!(label("role", "we\nb").is_err());
    }

    #[test]
    fn stop_signals_in_every_spelling_become_their_name() {
        for (text, name) in [
            ("SIGTERM", "SIGTERM"),
            ("TERM", "SIGTERM"),
            ("term", "SIGTERM"),
            ("sigterm", "SIGTERM"),
            (" SIGQUIT ", "SIGQUIT"),
            ("quit", "SIGQUIT"),
            ("3", "SIGQUIT"),
            ("15", "SIGTERM"),
            ("SIGWINCH", "SIGWINCH"),
            ("9", "SIGKILL"),
        ] {
            assert_eq!(stop_signal(text), Ok(name), "{text}");
        }
        for bad in [
            "",
            "SIG",
            "SIGNOPE",
            "SIGSTOP",
            "SIGRTMIN+3",
            "0",
            "99",
            "-15",
        ] {
            let e = stop_signal(bad).unwrap_err();
            assert!(e.message.contains(&format!("{bad:?}")), "{e}");
            assert!(e.message.contains("SIGTERM"), "{e}");
        }
    }

    #[test]
    fn statuses() {
        assert_eq!(parse_status("200"), Ok((200, 200)));
        assert_eq!(parse_status("200-299"), Ok((200, 299)));
        assert_eq!(parse_status(" 200 - 399 "), Ok((200, 399)));
        for bad in ["", "ok", "99", "600", "299-200", "200-", "-200"] {
            assert!(parse_status(bad).is_err(), "{bad}");
        }
        assert_eq!(status_code(204), Ok(204));
        assert!(status_code(0).is_err());
        assert!(status_code(70000).is_err());
    }

    #[test]
    fn statuses_on_the_wire_default_and_are_checked() {
        assert_eq!(status_range(0, 0, DEFAULT_HEALTH_STATUS), Ok((200, 399)));
        assert_eq!(status_range(0, 0, DEFAULT_SMOKE_STATUS), Ok((200, 200)));
        assert_eq!(status_range(204, 0, DEFAULT_HEALTH_STATUS), Ok((204, 204)));
        assert_eq!(
            status_range(200, 299, DEFAULT_HEALTH_STATUS),
            Ok((200, 299))
        );
        assert!(status_range(299, 200, DEFAULT_HEALTH_STATUS).is_err());
        assert!(status_range(700, 0, DEFAULT_HEALTH_STATUS).is_err());
        assert!(status_range(70000, 70001, DEFAULT_HEALTH_STATUS).is_err());
    }

    #[test]
    fn exec_checks_only_outside_containers() {
        assert!(exec_check(false).is_ok());
        let e = exec_check(true).unwrap_err();
        assert!(e.message.contains("not in the container"), "{e}");
    }
}
