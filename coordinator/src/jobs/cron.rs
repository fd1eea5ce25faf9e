//! Cron expressions as crontab(5) reads them: five fields (minute, hour,
//! day of month, month, day of week), each a list of `*`, `N`, `N-M`, with
//! an optional `/STEP`; month and weekday names; the `@hourly`-style
//! macros. As in Vixie cron, when both day fields are restricted a day
//! matching either one fires. Times are in a named zone from the system's
//! tz database: a time skipped by a clock change fires right after the
//! jump, a time repeated by one fires once.

use jiff::civil::{Date, DateTime};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};

/// The furthest ahead a next time is looked for: a leap day on a weekday
/// recurs within 28 years, but a schedule that rare is a typo.
const HORIZON_YEARS: i16 = 8;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    minutes: u64,
    hours: u32,
    days: u32,
    months: u16,
    weekdays: u8,
    /// Both day fields were restricted (neither started with `*`).
    either_day: bool,
}

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const WEEKDAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

struct Field {
    name: &'static str,
    min: u32,
    max: u32,
    names: &'static [&'static str],
}

const FIELDS: [Field; 5] = [
    Field {
        name: "minute",
        min: 0,
        max: 59,
        names: &[],
    },
    Field {
        name: "hour",
        min: 0,
        max: 23,
        names: &[],
    },
    Field {
        name: "day of month",
        min: 1,
        max: 31,
        names: &[],
    },
    Field {
        name: "month",
        min: 1,
        max: 12,
        names: &MONTHS,
    },
    // 7 is Sunday too.
    Field {
        name: "day of week",
        min: 0,
        max: 7,
        names: &WEEKDAYS,
    },
];

impl Cron {
    pub fn parse(expression: &str) -> Result<Self, String> {
        let expanded = match expression.trim() {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            other if other.starts_with('@') => {
                return Err(format!(
                    "{other:?} is not a schedule macro; use @yearly, @monthly, @weekly, @daily or @hourly, or five fields"
                ))
            }
            other => other,
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        if fields.len() != 5 {
            return Err(format!(
                "has {} fields; a schedule has five: minute hour day-of-month month day-of-week, e.g. \"*/15 * * * *\"",
                fields.len()
            ));
        }
        let mut sets = [0u64; 5];
        for (i, (text, field)) in fields.iter().zip(&FIELDS).enumerate() {
            sets[i] =
                parse_field(text, field).map_err(|e| format!("{} {text:?}: {e}", field.name))?;
        }
        // Sunday as 7 is Sunday as 0.
        let weekdays = ((sets[4] | (sets[4] >> 7)) & 0x7f) as u8;
        let cron = Self {
            minutes: sets[0],
            hours: sets[1] as u32,
            days: sets[2] as u32,
            months: sets[3] as u16,
            weekdays,
            either_day: !fields[2].starts_with('*') && !fields[4].starts_with('*'),
        };
        Ok(cron)
    }

    fn day_matches(&self, date: Date) -> bool {
        let day = self.days & (1 << date.day()) != 0;
        let weekday = self.weekdays & (1 << date.weekday().to_sunday_zero_offset()) != 0;
        if self.either_day {
            day || weekday
        } else {
            day && weekday
        }
    }

    /// The first time strictly after `after` that the schedule fires, in
    /// zone `tz`; `None` if it never does within the horizon (e.g. "0 0 31
    /// 2 *").
    pub fn next_after(&self, after: Timestamp, tz: &TimeZone) -> Option<Timestamp> {
        let start = after.to_zoned(tz.clone()).datetime();
        let horizon = start.year().saturating_add(HORIZON_YEARS);
        // The next whole minute in civil time.
        let mut at = start
            .with()
            .second(0)
            .subsec_nanosecond(0)
            .build()
            .ok()?
            .checked_add(1.minute())
            .ok()?;
        while at.year() <= horizon {
            if self.months & (1 << at.month()) == 0 {
                at = first_of_next_month(at)?;
                continue;
            }
            if !self.day_matches(at.date()) {
                at = at
                    .date()
                    .tomorrow()
                    .ok()?
                    .to_datetime(jiff::civil::time(0, 0, 0, 0));
                continue;
            }
            if self.hours & (1 << at.hour()) == 0 {
                at = at
                    .with()
                    .minute(0)
                    .build()
                    .ok()?
                    .checked_add(1.hour())
                    .ok()?;
                continue;
            }
            if self.minutes & (1 << at.minute()) == 0 {
                at = at.checked_add(1.minute()).ok()?;
                continue;
            }
            if let Some(fires) = instant(at, tz, after) {
                return Some(fires);
            }
            at = at.checked_add(1.minute()).ok()?;
        }
        None
    }
}

fn first_of_next_month(at: DateTime) -> Option<DateTime> {
    let first = at.date().first_of_month().checked_add(1_i32.month()).ok()?;
    Some(first.to_datetime(jiff::civil::time(0, 0, 0, 0)))
}

/// When civil time `at` happens in `tz`, if that is after `after`: a time
/// in a gap (clocks forward) is taken as the moment after the jump; of a
/// time that happens twice (clocks back) the first one still to come.
fn instant(at: DateTime, tz: &TimeZone, after: Timestamp) -> Option<Timestamp> {
    let ambiguous = tz.to_ambiguous_timestamp(at);
    [ambiguous.compatible().ok()?, ambiguous.later().ok()?]
        .into_iter()
        .find(|t| *t > after)
}

fn parse_field(text: &str, field: &Field) -> Result<u64, String> {
    let mut set = 0u64;
    for item in text.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((range, step)) => {
                let step: u32 = step
                    .parse()
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| format!("step {step:?} is not a whole number above 0"))?;
                (range, Some(step))
            }
            None => (item, None),
        };
        let (low, high) = if range == "*" {
            (field.min, field.max)
        } else if let Some((low, high)) = range.split_once('-') {
            (value(low, field)?, value(high, field)?)
        } else {
            let low = value(range, field)?;
            // "N/STEP" runs from N to the end of the range.
            (low, if step.is_some() { field.max } else { low })
        };
        if low > high {
            return Err(format!("range {range:?} runs backwards"));
        }
        let mut v = low;
        while v <= high {
            set |= 1 << v;
            match v.checked_add(step.unwrap_or(1)) {
                Some(next) => v = next,
                None => break,
            }
        }
    }
    Ok(set)
}

fn value(text: &str, field: &Field) -> Result<u32, String> {
    let lower = text.to_ascii_lowercase();
    if let Some(i) = field.names.iter().position(|n| *n == lower) {
        // Months count from 1 ("jan"), weekdays from 0 ("sun").
        return Ok(i as u32 + field.min.min(1));
    }
    let v: u32 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number{}", names_hint(field)))?;
    if v < field.min || v > field.max {
        return Err(format!("{v} is out of range {}-{}", field.min, field.max));
    }
    Ok(v)
}

fn names_hint(field: &Field) -> String {
    match field.names.first() {
        Some(first) => format!(" or a name such as {first:?}"),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    fn next(expr: &str, after: &str, zone: &str) -> String {
        let tz = TimeZone::get(zone).unwrap();
        Cron::parse(expr)
            .unwrap()
            .next_after(at(after), &tz)
            .map(|t| t.to_string())
            .unwrap_or_else(|| "never".into())
    }

    #[test]
    fn every_minute_fires_at_the_next_whole_minute() {
        assert_eq!(
            next("* * * * *", "2026-12-02T17:05:30Z", "UTC"),
            "2026-12-02T17:06:00Z"
        );
        assert_eq!(
            next("* * * * *", "2026-12-02T17:05:00Z", "UTC"),
            "2026-12-02T17:06:00Z"
        );
    }

    #[test]
    fn lists_ranges_steps_and_names() {
        assert_eq!(
            next("*/15 * * * *", "2026-12-02T17:05:00Z", "UTC"),
            "2026-12-02T17:15:00Z"
        );
        assert_eq!(
            next("5,35 9-17 * * mon-fri", "2026-12-04T17:40:00Z", "UTC"),
            "2026-12-07T09:05:00Z"
        );
        assert_eq!(
            next("0 3 * jan,jul *", "2026-12-02T00:00:00Z", "UTC"),
            "2027-01-01T03:00:00Z"
        );
        assert_eq!(
            next("10/20 * * * *", "2026-12-02T17:31:00Z", "UTC"),
            "2026-12-02T17:50:00Z"
        );
        assert_eq!(
            next("@daily", "2026-12-02T17:31:00Z", "UTC"),
            "2026-12-03T00:00:00Z"
        );
        // 7 is Sunday, like 0.
        assert_eq!(
            next("0 0 * * 7", "2026-12-02T00:00:00Z", "UTC"),
            "2026-12-06T00:00:00Z"
        );
    }

    #[test]
    fn restricted_day_fields_match_either() {
        // The 13th, or any Friday: Friday 2026-12-04 comes first.
        assert_eq!(
            next("0 0 13 * fri", "2026-12-02T00:00:00Z", "UTC"),
            "2026-12-04T00:00:00Z"
        );
        // With one day field `*`, both must match: Fridays only.
        assert_eq!(
            next("0 0 * * fri", "2026-12-05T00:00:00Z", "UTC"),
            "2026-12-11T00:00:00Z"
        );
    }

    #[test]
    fn a_named_zone_and_its_clock_changes() {
        // 02:30 does not exist in Berlin on 2027-03-28: it fires at 03:30
        // local, 01:30 UTC, right after the jump.
        assert_eq!(
            next("30 2 * * *", "2027-03-27T12:00:00Z", "Europe/Berlin"),
            "2027-03-28T01:30:00Z"
        );
        // 02:30 happens twice on 2026-10-25: once (the first), then the
        // next day.
        assert_eq!(
            next("30 2 * * *", "2026-10-24T12:00:00Z", "Europe/Berlin"),
            "2026-10-25T00:30:00Z"
        );
        assert_eq!(
            next("30 2 * * *", "2026-10-25T00:30:00Z", "Europe/Berlin"),
            "2026-10-26T01:30:00Z"
        );
        // Every 15 minutes fires each civil time once: the repeated hour
        // (02:00-02:59 CET after 02:59 CEST) is not run again, so the gap
        // is 75 minutes, once a year; never twice at one instant, never
        // backwards. (Interval-like schedules belong in UTC, the default.)
        let tz = TimeZone::get("Europe/Berlin").unwrap();
        let cron = Cron::parse("*/15 * * * *").unwrap();
        let mut t = at("2026-10-24T23:50:00Z");
        let mut longest = 0;
        for _ in 0..12 {
            let n = cron.next_after(t, &tz).unwrap();
            assert!(n > t, "{t} -> {n}");
            longest = longest.max(n.as_second() - t.as_second());
            t = n;
        }
        assert_eq!(longest, 75 * 60);
    }

    #[test]
    fn never_firing_schedules_say_so() {
        assert_eq!(next("0 0 31 2 *", "2026-12-02T00:00:00Z", "UTC"), "never");
        assert_eq!(
            next("0 0 29 2 *", "2026-12-02T00:00:00Z", "UTC"),
            "2028-02-29T00:00:00Z"
        );
    }

    #[test]
    fn bad_expressions_name_the_field() {
        for (expr, needle) in [
            ("* * * *", "has 4 fields"),
            ("61 * * * *", "minute \"61\": 61 is out of range 0-59"),
            (
                "* * * foo *",
                "month \"foo\": \"foo\" is not a number or a name such as \"jan\"",
            ),
            ("*/0 * * * *", "step \"0\""),
            ("5-1 * * * *", "runs backwards"),
            ("@reboot", "not a schedule macro"),
        ] {
            let error = Cron::parse(expr).unwrap_err();
            assert!(error.contains(needle), "{expr}: {error}");
        }
    }
}
