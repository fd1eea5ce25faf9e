//! A drill's checks: a query against the restored copy and what its value
//! must be. Timestamps are compared by PostgreSQL's own epoch (the query
//! is wrapped to return it), so no date parsing happens here.

use std::time::Duration;

use cutover_proto::v1 as pb;

/// The database a check runs in when it names none.
pub(super) const DEFAULT_DATABASE: &str = "postgres";

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Expectation {
    Equals(String),
    AtLeast(f64),
    AtMost(f64),
    /// A timestamp at most this old at the drill's start.
    MaxAge(Duration),
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct Check {
    pub name: String,
    pub sql: String,
    pub database: String,
    pub expect: Expectation,
}

impl Check {
    /// The check as the command carries it, or what is wrong with it.
    pub fn from_proto(check: &pb::RecoveryCheck) -> Result<Self, String> {
        use pb::recovery_check::Expect;
        if check.name.trim().is_empty() {
            return Err("has no name: name every check".into());
        }
        let sql = trimmed_sql(&check.sql);
        if sql.is_empty() {
            return Err("has no sql: give the query whose value is checked".into());
        }
        let expect = match &check.expect {
            Some(Expect::Equals(text)) => Expectation::Equals(text.clone()),
            Some(Expect::AtLeast(n)) if n.is_finite() => Expectation::AtLeast(*n),
            Some(Expect::AtMost(n)) if n.is_finite() => Expectation::AtMost(*n),
            Some(Expect::AtLeast(_) | Expect::AtMost(_)) => {
                return Err("compares to a number that is not finite: give a finite bound".into())
            }
            Some(Expect::MaxAgeMs(ms)) => Expectation::MaxAge(Duration::from_millis(*ms)),
            None => {
                return Err(
                    "has no expectation: give equals, at_least, at_most or max_age_ms".into(),
                )
            }
        };
        Ok(Self {
            name: check.name.clone(),
            sql: sql.to_string(),
            database: database_or_default(&check.database),
            expect,
        })
    }

    /// The query psql runs: the check's own, or, for a timestamp, one
    /// that gives its text and its epoch seconds ("text|epoch").
    pub fn query(&self) -> String {
        match self.expect {
            Expectation::MaxAge(_) => timestamp_query(&self.sql),
            _ => self.sql.clone(),
        }
    }

    /// Judges the rows psql printed (unaligned, tuples only) against the
    /// expectation; `drill_start` in unix seconds. The value seen, and
    /// what is wrong when it does not hold.
    pub fn judge(&self, rows: &str, drill_start: f64) -> (String, Result<String, String>) {
        let row = match single_row(rows) {
            Ok(row) => row,
            Err(e) => return (String::new(), Err(e)),
        };
        match &self.expect {
            Expectation::Equals(want) => {
                let verdict = if row == want {
                    Ok(format!("{row:?} as expected"))
                } else {
                    Err(format!("expected {want:?}, saw {row:?}"))
                };
                (row.to_string(), verdict)
            }
            Expectation::AtLeast(bound) => (
                row.to_string(),
                compare(row, *bound, "at least", |v| v >= *bound),
            ),
            Expectation::AtMost(bound) => (
                row.to_string(),
                compare(row, *bound, "at most", |v| v <= *bound),
            ),
            Expectation::MaxAge(max) => {
                let (text, epoch) = split_timestamp(row);
                let Some(epoch) = epoch else {
                    return (
                        text.to_string(),
                        Err(format!(
                            "expected a timestamp at most {} old, saw no timestamp ({})",
                            humantime::format_duration(*max),
                            if text.is_empty() { "NULL" } else { text }
                        )),
                    );
                };
                let age = Duration::from_secs_f64((drill_start - epoch).max(0.0));
                let age_text = humantime::format_duration(Duration::from_secs(age.as_secs()));
                let verdict = if age <= *max {
                    Ok(format!("{age_text} old at the drill's start"))
                } else {
                    Err(format!(
                        "expected at most {} old at the drill's start, saw {text} ({age_text} old)",
                        humantime::format_duration(*max)
                    ))
                };
                (text.to_string(), verdict)
            }
        }
    }
}

fn compare(
    row: &str,
    bound: f64,
    relation: &str,
    holds: impl Fn(f64) -> bool,
) -> Result<String, String> {
    match row.trim().parse::<f64>() {
        Ok(value) if holds(value) => Ok(format!("{row} is {relation} {bound}")),
        Ok(_) => Err(format!("expected {relation} {bound}, saw {row}")),
        Err(_) => Err(format!(
            "expected a number {relation} {bound}, saw {:?}",
            row
        )),
    }
}

/// The database named, or the default.
pub(super) fn database_or_default(database: &str) -> String {
    match database.trim() {
        "" => DEFAULT_DATABASE.to_string(),
        name => name.to_string(),
    }
}

/// A query without the trailing `;` and blanks that would break wrapping it.
pub(super) fn trimmed_sql(sql: &str) -> &str {
    sql.trim()
        .trim_end_matches(|c: char| c == ';' || c.is_whitespace())
}

/// `sql`'s first column as its text and its epoch seconds: one query
/// (run once) whose row is "text|epoch"; "|" when it is NULL.
pub(super) fn timestamp_query(sql: &str) -> String {
    format!(
        "select v::text, extract(epoch from v)::float8 from ({}) as cutover_check(v)",
        trimmed_sql(sql)
    )
}

/// The text and epoch of a `timestamp_query` row; no epoch for NULL.
pub(super) fn split_timestamp(row: &str) -> (&str, Option<f64>) {
    match row.rsplit_once('|') {
        Some((text, epoch)) => (text, epoch.trim().parse().ok()),
        None => (row, None),
    }
}

/// The one row a check's query must return.
pub(super) fn single_row(rows: &str) -> Result<&str, String> {
    // psql prints nothing for no row, and an empty line for a NULL.
    if rows.is_empty() {
        return Err("the query returned no row; a check's query must return one row".into());
    }
    let rows: Vec<&str> = rows
        .strip_suffix('\n')
        .unwrap_or(rows)
        .split('\n')
        .collect();
    match rows.as_slice() {
        [row] => Ok(row),
        more => Err(format!(
            "the query returned {} rows; a check's query must return one row",
            more.len()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::recovery_check::Expect;

    fn check(expect: Option<Expect>) -> Result<Check, String> {
        Check::from_proto(&pb::RecoveryCheck {
            name: "orders".into(),
            sql: "select count(*) from orders ; ".into(),
            database: String::new(),
            expect,
        })
    }

    #[test]
    fn a_check_needs_a_name_sql_and_an_expectation() {
        let ok = check(Some(Expect::AtLeast(10.0))).unwrap();
        assert_eq!(ok.sql, "select count(*) from orders");
        assert_eq!(ok.database, "postgres");
        assert_eq!(
            check(None).unwrap_err(),
            "has no expectation: give equals, at_least, at_most or max_age_ms"
        );
        assert!(check(Some(Expect::AtMost(f64::NAN))).is_err());
        let nameless = Check::from_proto(&pb::RecoveryCheck {
            sql: "select 1".into(),
            expect: Some(Expect::Equals("1".into())),
            ..Default::default()
        });
        assert_eq!(nameless.unwrap_err(), "has no name: name every check");
    }

    #[test]
    fn numbers_and_text_are_judged_with_what_was_seen() {
        let at_least = check(Some(Expect::AtLeast(1000.0))).unwrap();
        assert_eq!(
            at_least.judge("1500\n", 0.0),
            ("1500".into(), Ok("1500 is at least 1000".into()))
        );
        assert_eq!(
            at_least.judge("999\n", 0.0),
            ("999".into(), Err("expected at least 1000, saw 999".into()))
        );
        assert_eq!(
            at_least.judge("many\n", 0.0).1,
            Err("expected a number at least 1000, saw \"many\"".into())
        );
        let at_most = check(Some(Expect::AtMost(0.0))).unwrap();
        assert!(at_most.judge("0\n", 0.0).1.is_ok());
        assert_eq!(
            at_most.judge("3\n", 0.0).1,
            Err("expected at most 0, saw 3".into())
        );
        let equals = check(Some(Expect::Equals("t".into()))).unwrap();
        assert!(equals.judge("t\n", 0.0).1.is_ok());
        assert_eq!(
            equals.judge("f\n", 0.0).1,
            Err("expected \"t\", saw \"f\"".into())
        );
    }

    #[test]
    fn a_check_returns_exactly_one_row() {
        let equals = check(Some(Expect::Equals("".into()))).unwrap();
        // NULL prints as an empty value, which is a row.
        assert!(equals.judge("\n", 0.0).1.is_ok());
        assert_eq!(
            equals.judge("", 0.0).1,
            Err("the query returned no row; a check's query must return one row".into())
        );
        assert_eq!(
            equals.judge("a\nb\n", 0.0).1,
            Err("the query returned 2 rows; a check's query must return one row".into())
        );
    }

    #[test]
    fn a_timestamp_is_judged_by_its_age_at_the_drill_start() {
        let fresh = check(Some(Expect::MaxAgeMs(3_600_000))).unwrap();
        assert_eq!(
            fresh.query(),
            "select v::text, extract(epoch from v)::float8 from (select count(*) from orders) as cutover_check(v)"
        );
        let start = 1_796_229_693.0 + 600.0;
        let row = "2026-12-02 16:41:33.84572+00|1796229693.84572\n";
        assert_eq!(
            fresh.judge(row, start),
            (
                "2026-12-02 16:41:33.84572+00".into(),
                Ok("9m 59s old at the drill's start".into())
            )
        );
        let (_, stale) = fresh.judge(row, start + 7200.0);
        assert_eq!(
            stale,
            Err("expected at most 1h old at the drill's start, saw 2026-12-02 16:41:33.84572+00 (2h 9m 59s old)".into())
        );
        assert_eq!(
            fresh.judge("|\n", start).1,
            Err("expected a timestamp at most 1h old, saw no timestamp (NULL)".into())
        );
    }
}
