use std::io::Write;
use std::time::{Duration, SystemTime};

use super::*;
use crate::runtime::logs::{numbered, open_append, pass};

/// One release's logs as a release writes them and the agent's passes see
/// them, at times the test chooses.
struct Logs {
    root: tempfile::TempDir,
    release: String,
    indexes: [Option<LogIndex>; 2],
    max_bytes: u64,
    keep: u32,
}

impl Logs {
    fn new(release: &str) -> Self {
        Self {
            root: tempfile::tempdir().unwrap(),
            release: release.into(),
            indexes: [None, None],
            max_bytes: 1 << 20,
            keep: 3,
        }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.root.path().join("web").join(&self.release).join(file)
    }

    fn write(&self, file: &str, text: &str) {
        open_append(&self.path(file))
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }

    /// The agent's pass over both logs at `now_ms`.
    fn pass(&mut self, now_ms: i64) {
        for (slot, file) in [0, 1].into_iter().zip([STDOUT, STDERR]) {
            let path = self.path(file);
            pass(
                &path,
                &mut self.indexes[slot],
                self.max_bytes,
                self.keep,
                now_ms,
            )
            .unwrap();
        }
    }

    fn ask(
        &self,
        since_ms: i64,
        cursors: &[pb::LogCursor],
        max_bytes: u64,
        now_ms: i64,
    ) -> pb::LogChunk {
        let request = pb::ReadLogs {
            service: "web".into(),
            release_id: String::new(),
            since_ms,
            cursors: cursors.to_vec(),
            max_bytes,
        };
        read(self.root.path(), &request, now_ms).unwrap()
    }

    /// Reads until nothing more is there now; the lines and the cursors
    /// to go on from.
    fn read_on(
        &self,
        since_ms: i64,
        cursors: &mut Vec<pb::LogCursor>,
        max_bytes: u64,
        now_ms: i64,
    ) -> (Vec<String>, usize) {
        let (mut lines, mut answers) = (Vec::new(), 0);
        loop {
            let chunk = self.ask(since_ms, cursors, max_bytes, now_ms);
            answers += 1;
            lines.extend(chunk.lines.into_iter().map(|l| l.text));
            *cursors = chunk.cursors;
            if !chunk.more {
                return (lines, answers);
            }
            assert!(answers < 1000, "reading never ends");
        }
    }
}

fn numbered_lines(from: usize, to: usize) -> (String, Vec<String>) {
    let lines: Vec<String> = (from..to)
        .map(|n| format!("line {n:04} {}", "x".repeat(40)))
        .collect();
    (lines.iter().map(|l| format!("{l}\n")).collect(), lines)
}

#[test]
fn a_cursor_follows_a_stream_across_rotations_without_losing_or_repeating_a_line() {
    let mut logs = Logs::new("web-v1");
    logs.max_bytes = 2000;
    let (first, expected_first) = numbered_lines(0, 10);
    logs.write(STDOUT, &first);
    logs.pass(1_000);
    let mut cursors = Vec::new();
    let (lines, _) = logs.read_on(0, &mut cursors, 0, 1_500);
    assert_eq!(lines, expected_first);

    // Past max_bytes: rotated by the next pass, then more lines.
    let (second, expected_second) = numbered_lines(10, 50);
    logs.write(STDOUT, &second);
    logs.pass(3_000);
    assert!(numbered(&logs.path(STDOUT), 1).exists(), "rotated");
    let (third, expected_third) = numbered_lines(50, 55);
    logs.write(STDOUT, &third);
    let (lines, _) = logs.read_on(0, &mut cursors, 0, 3_500);
    assert_eq!(lines, [expected_second, expected_third].concat());

    let (fourth, expected_fourth) = numbered_lines(55, 58);
    logs.write(STDOUT, &fourth);
    logs.pass(5_000);
    let (lines, _) = logs.read_on(0, &mut cursors, 0, 5_500);
    assert_eq!(lines, expected_fourth);
    let (lines, _) = logs.read_on(0, &mut cursors, 0, 6_000);
    assert!(lines.is_empty(), "nothing new: {lines:?}");
}

#[test]
fn since_starts_at_the_first_line_seen_at_or_after_it() {
    let mut logs = Logs::new("web-v1");
    logs.write(STDOUT, "a1\na2\na3\n");
    logs.pass(1_000);
    logs.write(STDOUT, "b1\nb2\nb3\n");
    logs.pass(3_000);
    logs.write(STDOUT, "c1\nc2\n"); // no pass saw them yet: seen "now"
    let times = |since| {
        let chunk = logs.ask(since, &[], 0, 5_000);
        chunk
            .lines
            .iter()
            .map(|l| (l.text.clone(), l.time_ms))
            .collect::<Vec<_>>()
    };
    assert_eq!(times(1_000).len(), 8);
    assert_eq!(
        times(2_000),
        [
            ("b1".to_string(), 3_000),
            ("b2".into(), 3_000),
            ("b3".into(), 3_000),
            ("c1".into(), 5_000),
            ("c2".into(), 5_000)
        ]
    );
    assert_eq!(times(4_000).len(), 2);

    // A pass that saw half a line: the line began before, and is older.
    logs.pass(5_000);
    logs.write(STDOUT, "half");
    logs.pass(6_000);
    logs.write(STDOUT, " and the rest\nnext\n");
    logs.pass(8_000);
    let texts: Vec<String> = logs
        .ask(7_000, &[], 0, 9_000)
        .lines
        .into_iter()
        .map(|l| l.text)
        .collect();
    assert_eq!(texts, ["next"]);
}

#[test]
fn answers_are_bounded_and_reading_on_gets_every_line_once_in_time_order() {
    let mut logs = Logs::new("web-v1");
    let (many, expected_out) = numbered_lines(0, 600);
    logs.write(STDOUT, &many);
    let long = "y".repeat(MAX_LINE * 2 + 100);
    logs.write(STDOUT, &format!("{long}\n"));
    logs.pass(1_000);
    // Seen later than all of stdout: held back until stdout is read.
    logs.write(STDERR, "err 1\nerr 2\n");
    logs.pass(2_000);

    let first = logs.ask(0, &[], 1, 2_500);
    assert!(first.more, "a small answer first");
    let bytes: usize = first.lines.iter().map(|l| l.text.len() + 1).sum();
    assert!(bytes <= 2 * MAX_LINE, "{bytes} bytes in one answer");
    assert!(first
        .lines
        .iter()
        .all(|l| l.stream == LogStream::Stdout as i32));

    let mut cursors = Vec::new();
    let (lines, answers) = logs.read_on(0, &mut cursors, 1, 2_500);
    assert!(answers > 2, "in several answers: {answers}");
    let pieces = vec![
        long[..MAX_LINE].to_string(),
        long[MAX_LINE..2 * MAX_LINE].to_string(),
        long[2 * MAX_LINE..].to_string(),
    ];
    let expected = [
        expected_out,
        pieces,
        vec!["err 1".to_string(), "err 2".to_string()],
    ]
    .concat();
    assert_eq!(lines, expected);
}

#[test]
fn a_live_logs_unfinished_last_line_waits_for_its_end() {
    let mut logs = Logs::new("web-v1");
    logs.write(STDERR, "one\ntw");
    logs.pass(1_000);
    let chunk = logs.ask(0, &[], 0, 1_500);
    assert_eq!(chunk.lines.len(), 1);
    assert!(!chunk.more, "the rest is not written yet");
    logs.write(STDERR, "o\r\n");
    let again = logs.ask(0, &chunk.cursors, 0, 2_000);
    let texts: Vec<&str> = again.lines.iter().map(|l| l.text.as_str()).collect();
    assert_eq!(texts, ["two"]);
}

#[test]
fn a_cursor_whose_copy_was_rotated_away_reads_on_from_the_oldest_copy_kept() {
    let mut logs = Logs::new("web-v1");
    (logs.max_bytes, logs.keep) = (10, 1);
    logs.write(STDOUT, "old\n");
    let cursors = logs.ask(0, &[], 0, 500).cursors;
    logs.write(STDOUT, "gone with the first copy\n");
    logs.pass(1_000);
    logs.write(STDOUT, "kept in the copy\n");
    logs.pass(2_000);
    logs.write(STDOUT, "live\n");
    let texts: Vec<String> = logs
        .ask(0, &cursors, 0, 2_500)
        .lines
        .into_iter()
        .map(|l| l.text)
        .collect();
    assert_eq!(texts, ["kept in the copy", "live"]);
}

#[test]
fn without_a_release_the_ten_written_to_last_are_read_and_names_are_checked() {
    let logs = Logs::new("unused");
    let dir = logs.root.path().join("web");
    for n in 0..12u64 {
        let file = dir.join(format!("web-v{n}")).join(STDOUT);
        open_append(&file)
            .unwrap()
            .write_all(format!("from v{n}\n").as_bytes())
            .unwrap();
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + n))
            .unwrap();
    }
    let chunk = logs.ask(0, &[], 0, 1_000);
    let mut releases: Vec<&str> = chunk.lines.iter().map(|l| l.release_id.as_str()).collect();
    releases.sort();
    let mut expected: Vec<String> = (2..12).map(|n| format!("web-v{n}")).collect();
    expected.sort();
    assert_eq!(releases, expected);
    assert!(chunk
        .lines
        .iter()
        .all(|l| l.text == format!("from {}", &l.release_id[4..])));

    let one = read(
        logs.root.path(),
        &pb::ReadLogs {
            service: "web".into(),
            release_id: "web-v0".into(),
            ..Default::default()
        },
        1_000,
    )
    .unwrap();
    assert_eq!(one.lines.len(), 1, "a named release, however old");
    for (service, release) in [("../web", ""), ("web", "../../etc")] {
        let refused = read(
            logs.root.path(),
            &pb::ReadLogs {
                service: service.into(),
                release_id: release.into(),
                ..Default::default()
            },
            1_000,
        );
        assert!(
            matches!(refused, Err(ReadError::Invalid(_))),
            "{service} {release}"
        );
    }
    let none = read(
        logs.root.path(),
        &pb::ReadLogs {
            service: "api".into(),
            ..Default::default()
        },
        1_000,
    )
    .unwrap();
    assert!(
        none.lines.is_empty() && !none.more,
        "no logs of a service: nothing"
    );
}
