//! Freeze windows (`freeze = [...]` with a `timezone`): the times an
//! environment takes no deploy or promotion. A window is weekly
//! (`Fri 16:00 - Mon 08:00`, across the week's end if it says so) or dated
//! (`2026-12-20 - 2027-01-02`, whole days, the end day included; or with
//! times, `2026-12-24 12:00 - 2026-12-27 08:00`). Times are civil times of
//! the zone, so `Fri 16:00` stays 16:00 across a change of daylight saving
//! time. The clock is the caller's: every function takes `now`.

use jiff::civil::{Date, DateTime, Time, Weekday};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};

const WEEK_MINUTES: u32 = 7 * 24 * 60;
const DAYS: [(&str, &str, Weekday); 7] = [
    ("mon", "monday", Weekday::Monday),
    ("tue", "tuesday", Weekday::Tuesday),
    ("wed", "wednesday", Weekday::Wednesday),
    ("thu", "thursday", Weekday::Thursday),
    ("fri", "friday", Weekday::Friday),
    ("sat", "saturday", Weekday::Saturday),
    ("sun", "sunday", Weekday::Sunday),
];

#[derive(Debug, Clone, PartialEq, Eq)]
enum Span {
    /// Minutes since Monday 00:00; `end` before `start` wraps over the
    /// week's end.
    Weekly { start: u32, end: u32 },
    /// `end` excluded.
    Dated { start: DateTime, end: DateTime },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Window {
    text: String,
    span: Span,
}

/// An environment's windows in its zone, checked.
#[derive(Debug, Clone)]
pub struct Freeze {
    windows: Vec<Window>,
    tz: TimeZone,
    timezone: String,
}

/// The window `now` is in, and when the environment thaws (the end of it
/// and of any window it runs into).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frozen {
    pub window: String,
    pub until: Timestamp,
}

/// The next window to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upcoming {
    pub window: String,
    pub starts: Timestamp,
    pub ends: Timestamp,
}

impl Freeze {
    /// Checks `windows` in zone `timezone` ("UTC" when `None`); an error
    /// names the key (`freeze[1]`, `timezone`) and what is wrong.
    pub fn parse(windows: &[String], timezone: Option<&str>) -> Result<Self, (String, String)> {
        let timezone = timezone.unwrap_or("UTC").to_string();
        let tz = TimeZone::get(&timezone).map_err(|e| {
            (
                "timezone".to_string(),
                format!("{timezone:?} is not a zone of this machine's tz database ({e}); use a name such as \"Europe/Berlin\", or install tzdata"),
            )
        })?;
        let mut parsed: Vec<Window> = Vec::new();
        for (i, text) in windows.iter().enumerate() {
            let key = format!("freeze[{i}]");
            let span = parse_span(text).map_err(|m| (key.clone(), format!("{text:?}: {m}")))?;
            if let Some(other) = parsed.iter().find(|w| overlap(&w.span, &span)) {
                return Err((
                    key,
                    format!(
                        "{text:?} overlaps {:?}; merge them into one window",
                        other.text
                    ),
                ));
            }
            parsed.push(Window {
                text: text.clone(),
                span,
            });
        }
        Ok(Self {
            windows: parsed,
            tz,
            timezone,
        })
    }

    pub fn timezone(&self) -> &str {
        &self.timezone
    }

    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    pub fn windows(&self) -> impl Iterator<Item = &str> {
        self.windows.iter().map(|w| w.text.as_str())
    }

    /// The window `now` falls in, with when the freeze ends: a weekly
    /// window that runs into a dated one (or the other way round) thaws at
    /// the end of the last.
    pub fn frozen_at(&self, now: Timestamp) -> Option<Frozen> {
        let first = self.windows.iter().find_map(|w| self.ends(w, now))?;
        let mut frozen = Frozen {
            window: first.0.text.clone(),
            until: first.1,
        };
        // Windows of one kind never overlap; of both kinds they chain at
        // most once per window.
        for _ in 0..=self.windows.len() {
            let Some(later) = self
                .windows
                .iter()
                .filter_map(|w| self.ends(w, frozen.until))
                .map(|(_, end)| end)
                .max()
                .filter(|end| *end > frozen.until)
            else {
                break;
            };
            frozen.until = later;
        }
        Some(frozen)
    }

    /// The window that starts next after `now` (one that runs now is not
    /// next).
    pub fn next_after(&self, now: Timestamp) -> Option<Upcoming> {
        self.windows
            .iter()
            .filter_map(|w| {
                let starts = self.next_start(w, now)?;
                let (_, ends) = self.ends(w, starts)?;
                Some(Upcoming {
                    window: w.text.clone(),
                    starts,
                    ends,
                })
            })
            .min_by_key(|u| u.starts)
    }

    /// When `window` ends, if `at` falls in it.
    fn ends<'a>(&self, window: &'a Window, at: Timestamp) -> Option<(&'a Window, Timestamp)> {
        let local = at.to_zoned(self.tz.clone()).datetime();
        match &window.span {
            Span::Weekly { start, end } => {
                let minute = week_minute(local);
                let inside = if start < end {
                    (*start..*end).contains(&minute)
                } else {
                    minute >= *start || minute < *end
                };
                inside.then(|| (window, self.weekly_after(local, *end)))
            }
            Span::Dated { start, end } => {
                (*start <= local && local < *end).then(|| (window, self.instant(*end)))
            }
        }
    }

    fn next_start(&self, window: &Window, now: Timestamp) -> Option<Timestamp> {
        let local = now.to_zoned(self.tz.clone()).datetime();
        match &window.span {
            Span::Weekly { start, .. } => Some(self.weekly_after(local, *start)),
            Span::Dated { start, .. } => Some(self.instant(*start)).filter(|t| *t > now),
        }
    }

    /// The first time after civil time `local` that the week is at `minute`.
    fn weekly_after(&self, local: DateTime, minute: u32) -> Timestamp {
        let now = week_minute(local);
        let ahead = (minute + WEEK_MINUTES - now) % WEEK_MINUTES;
        let ahead = if ahead == 0 { WEEK_MINUTES } else { ahead };
        // Counted in civil minutes from the start of the current minute,
        // so a change of daylight saving time keeps the wall-clock time.
        let at = local
            .with()
            .second(0)
            .subsec_nanosecond(0)
            .build()
            .ok()
            .and_then(|m| m.checked_add(i64::from(ahead).minutes()).ok())
            .unwrap_or(local);
        self.instant(at)
    }

    /// When civil time `at` happens in the zone: in a gap (clocks forward),
    /// the moment after the jump; twice (clocks back), the first.
    fn instant(&self, at: DateTime) -> Timestamp {
        self.tz
            .to_ambiguous_timestamp(at)
            .compatible()
            .unwrap_or(Timestamp::MAX)
    }

    /// `at` as the zone's clock shows it, e.g. "Mon 2026-12-07 08:00 CET".
    pub fn show(&self, at: Timestamp) -> String {
        at.to_zoned(self.tz.clone())
            .strftime("%a %Y-%m-%d %H:%M %Z")
            .to_string()
    }
}

fn week_minute(local: DateTime) -> u32 {
    let day = local.weekday().to_monday_zero_offset() as u32;
    day * 24 * 60 + local.hour() as u32 * 60 + local.minute() as u32
}

fn parse_span(text: &str) -> Result<Span, String> {
    let Some((from, to)) = text.split_once(" - ") else {
        return Err("a window is \"DAY HH:MM - DAY HH:MM\" (weekly) or \"YYYY-MM-DD[ HH:MM] - YYYY-MM-DD[ HH:MM]\" (dated), with \" - \" between its ends".into());
    };
    let (from, to) = (from.trim(), to.trim());
    let weekly = |s: &str| s.split_whitespace().next().and_then(weekday).is_some();
    match (weekly(from), weekly(to)) {
        (true, true) => {
            let (start, end) = (weekly_point(from)?, weekly_point(to)?);
            if start == end {
                return Err("starts and ends at the same time; a window of a whole week freezes the environment for good: say so with a dated window".into());
            }
            Ok(Span::Weekly { start, end })
        }
        (false, false) => {
            let start = dated_point(from, false)?;
            let end = dated_point(to, true)?;
            if end <= start {
                return Err("ends before it starts".into());
            }
            Ok(Span::Dated { start, end })
        }
        (from_weekly, _) => {
            let odd = if from_weekly { to } else { from };
            match dated_point(odd, false) {
                Ok(_) => Err("mixes a day of the week with a date; both ends are days of the week, or both dates".into()),
                Err(_) => Err(format!("{odd:?} is neither a day of the week with a time (\"Fri 16:00\") nor a date (\"2026-12-20\")")),
            }
        }
    }
}

fn weekday(word: &str) -> Option<Weekday> {
    let word = word.to_ascii_lowercase();
    DAYS.iter()
        .find(|(short, long, _)| word == *short || word == *long)
        .map(|(_, _, day)| *day)
}

/// "Fri 16:00" as minutes since Monday 00:00.
fn weekly_point(text: &str) -> Result<u32, String> {
    let mut words = text.split_whitespace();
    let day = words.next().and_then(weekday).ok_or_else(|| {
        format!("{text:?} does not start with a day of the week (Mon, Tue, ... or Monday, ...)")
    })?;
    let time = match (words.next(), words.next()) {
        (Some(time), None) => parse_time(time)?,
        _ => return Err(format!("{text:?} is not \"DAY HH:MM\"")),
    };
    Ok(day.to_monday_zero_offset() as u32 * 24 * 60
        + time.hour() as u32 * 60
        + time.minute() as u32)
}

/// "2026-12-20" or "2026-12-20 16:00"; a date alone at the `end` of a
/// window means the whole day, so it ends at the next midnight.
fn dated_point(text: &str, end: bool) -> Result<DateTime, String> {
    let mut words = text.split_whitespace();
    let date: Date = words
        .next()
        .unwrap_or_default()
        .parse()
        .map_err(|_| format!("{text:?} is not a date YYYY-MM-DD (with HH:MM, or without)"))?;
    match (words.next(), words.next()) {
        (None, _) if end => date
            .tomorrow()
            .map(|d| d.to_datetime(jiff::civil::time(0, 0, 0, 0)))
            .map_err(|e| format!("{text:?}: {e}")),
        (None, _) => Ok(date.to_datetime(jiff::civil::time(0, 0, 0, 0))),
        (Some(time), None) => Ok(date.to_datetime(parse_time(time)?)),
        _ => Err(format!("{text:?} is not \"YYYY-MM-DD HH:MM\"")),
    }
}

fn parse_time(text: &str) -> Result<Time, String> {
    let invalid = || format!("{text:?} is not a time HH:MM (00:00 to 23:59)");
    let (h, m) = text.split_once(':').ok_or_else(invalid)?;
    if m.len() != 2 || !(1..=2).contains(&h.len()) {
        return Err(invalid());
    }
    let (h, m): (i8, i8) = (
        h.parse().map_err(|_| invalid())?,
        m.parse().map_err(|_| invalid())?,
    );
    Time::new(h, m, 0, 0).map_err(|_| invalid())
}

/// Whether two windows of the same kind share a minute (weekly and dated
/// windows may: a holiday freeze spans weekends).
fn overlap(a: &Span, b: &Span) -> bool {
    match (a, b) {
        (Span::Weekly { .. }, Span::Weekly { .. }) => {
            let (a, b) = (linear(a), linear(b));
            a.iter()
                .any(|(s1, e1)| b.iter().any(|(s2, e2)| s1 < e2 && s2 < e1))
        }
        (Span::Dated { start: s1, end: e1 }, Span::Dated { start: s2, end: e2 }) => {
            s1 < e2 && s2 < e1
        }
        _ => false,
    }
}

/// A weekly window as one or two ranges of the week's minutes.
fn linear(span: &Span) -> Vec<(u32, u32)> {
    match *span {
        Span::Weekly { start, end } if start < end => vec![(start, end)],
        Span::Weekly { start, end } => vec![(start, WEEK_MINUTES), (0, end)],
        Span::Dated { .. } => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(tz: &str, civil: &str) -> Timestamp {
        let dt: DateTime = civil.parse().unwrap();
        dt.to_zoned(TimeZone::get(tz).unwrap()).unwrap().timestamp()
    }

    fn freeze(windows: &[&str], tz: &str) -> Freeze {
        let windows: Vec<String> = windows.iter().map(|w| w.to_string()).collect();
        Freeze::parse(&windows, Some(tz)).unwrap()
    }

    #[test]
    fn a_weekend_window_spans_the_week_end_in_its_zone() {
        let f = freeze(&["Fri 16:00 - Mon 08:00"], "Europe/Berlin");
        // 2026-12-04 is a Friday.
        assert_eq!(f.frozen_at(at("Europe/Berlin", "2026-12-04T15:59")), None);
        let frozen = f
            .frozen_at(at("Europe/Berlin", "2026-12-04T16:00"))
            .unwrap();
        assert_eq!(frozen.window, "Fri 16:00 - Mon 08:00");
        assert_eq!(frozen.until, at("Europe/Berlin", "2026-12-07T08:00"));
        assert!(f
            .frozen_at(at("Europe/Berlin", "2026-12-06T23:00"))
            .is_some());
        assert!(f
            .frozen_at(at("Europe/Berlin", "2026-12-07T07:59"))
            .is_some());
        assert_eq!(f.frozen_at(at("Europe/Berlin", "2026-12-07T08:00")), None);
        // 16:00 in Berlin is 15:00 UTC in winter: the zone decides.
        assert!(f.frozen_at(at("UTC", "2026-12-04T15:00")).is_some());
        assert!(f.frozen_at(at("UTC", "2026-12-04T14:59")).is_none());
        assert_eq!(
            f.show(frozen.until),
            "Mon 2026-12-07 08:00 CET",
            "shown on the zone's clock"
        );
    }

    #[test]
    fn a_weekly_window_keeps_its_wall_clock_time_across_daylight_saving() {
        // Clocks go forward on Sunday 2027-03-28 in Berlin: the window
        // still ends at 08:00 local, 06:00 UTC instead of 07:00.
        let f = freeze(&["Fri 16:00 - Mon 08:00"], "Europe/Berlin");
        let frozen = f
            .frozen_at(at("Europe/Berlin", "2027-03-27T12:00"))
            .unwrap();
        assert_eq!(frozen.until, at("UTC", "2027-03-29T06:00"));
    }

    #[test]
    fn a_dated_window_takes_its_end_day_whole() {
        let f = freeze(&["2026-12-20 - 2027-01-02"], "UTC");
        assert!(f.frozen_at(at("UTC", "2026-12-19T23:59")).is_none());
        assert!(f.frozen_at(at("UTC", "2026-12-20T00:00")).is_some());
        let frozen = f.frozen_at(at("UTC", "2027-01-02T23:59")).unwrap();
        assert_eq!(frozen.until, at("UTC", "2027-01-03T00:00"));
        assert!(f.frozen_at(at("UTC", "2027-01-03T00:00")).is_none());
        let f = freeze(&["2026-12-24 12:00 - 2026-12-27 08:00"], "UTC");
        assert!(f.frozen_at(at("UTC", "2026-12-24T11:59")).is_none());
        assert!(f.frozen_at(at("UTC", "2026-12-27T07:59")).is_some());
        assert!(f.frozen_at(at("UTC", "2026-12-27T08:00")).is_none());
    }

    #[test]
    fn chained_windows_thaw_at_the_end_of_the_last() {
        // The holiday freeze ends on a Saturday, inside the weekend window.
        let f = freeze(&["Fri 16:00 - Mon 08:00", "2026-12-20 - 2027-01-01"], "UTC");
        let frozen = f.frozen_at(at("UTC", "2026-12-28T10:00")).unwrap();
        assert_eq!(frozen.window, "2026-12-20 - 2027-01-01");
        // 2027-01-02 is a Saturday: thawed on Monday 2027-01-04 08:00.
        assert_eq!(frozen.until, at("UTC", "2027-01-04T08:00"));
    }

    #[test]
    fn the_next_window_is_the_one_that_starts_first() {
        let f = freeze(&["Fri 16:00 - Mon 08:00", "2026-12-20 - 2027-01-02"], "UTC");
        let next = f.next_after(at("UTC", "2026-12-02T10:00")).unwrap();
        assert_eq!(next.window, "Fri 16:00 - Mon 08:00");
        assert_eq!(next.starts, at("UTC", "2026-12-04T16:00"));
        assert_eq!(next.ends, at("UTC", "2026-12-07T08:00"));
        // Inside the weekend window, the next start is the holiday one
        // (a Sunday, itself inside the following weekend's window).
        let next = f.next_after(at("UTC", "2026-12-18T17:00")).unwrap();
        assert_eq!(next.window, "2026-12-20 - 2027-01-02");
        let f = freeze(&["2026-01-01 - 2026-01-02"], "UTC");
        assert_eq!(f.next_after(at("UTC", "2026-12-02T10:00")), None, "past");
    }

    #[test]
    fn bad_windows_are_refused_with_the_key_and_the_reason() {
        let err = |windows: &[&str], tz: Option<&str>| {
            let windows: Vec<String> = windows.iter().map(|w| w.to_string()).collect();
            Freeze::parse(&windows, tz).unwrap_err()
        };
        let (key, message) = err(&["Fri 16:00 - Mon 08:00", "Sun 10:00 - Sun 12:00"], None);
        assert_eq!(key, "freeze[1]");
        assert!(
            message.contains("overlaps \"Fri 16:00 - Mon 08:00\""),
            "{message}"
        );
        let (key, message) = err(
            &["2026-12-20 - 2027-01-02", "2027-01-01 - 2027-01-05"],
            None,
        );
        assert_eq!(key, "freeze[1]");
        assert!(message.contains("overlaps"), "{message}");
        assert!(err(&["Fri 16:00 to Mon 08:00"], None).1.contains("\" - \""));
        assert!(err(&["Fri 25:00 - Mon 08:00"], None)
            .1
            .contains("not a time HH:MM"));
        assert!(err(&["Fry 16:00 - Mon 08:00"], None).1.contains("neither"));
        assert!(err(&["Fri 16:00 - 2026-12-20"], None).1.contains("mixes"));
        assert!(err(&["2026-13-01 - 2026-12-20"], None)
            .1
            .contains("not a date"));
        assert!(err(&["2026-12-20 - 2026-12-01"], None)
            .1
            .contains("ends before"));
        assert!(err(&["Mon 08:00 - Mon 08:00"], None)
            .1
            .contains("same time"));
        let (key, message) = err(&["Fri 16:00 - Mon 08:00"], Some("Mars/Olympus"));
        assert_eq!(key, "timezone");
        assert!(message.contains("Mars/Olympus"), "{message}");
        // Weekly and dated windows may overlap: a holiday spans weekends.
        freeze(&["Fri 16:00 - Mon 08:00", "2026-12-20 - 2027-01-02"], "UTC");
    }
}
