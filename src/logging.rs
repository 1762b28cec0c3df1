//! Logging set-up: `log` records go to stderr through env_logger (SPEC O-3, STYLE §7).
//!
//! Shell module with a pure core. [`init`] looks at the process (environment, stderr) once and
//! installs the logger; the line format is the pure function [`format_record`], which takes the
//! time as a parameter.
//!
//! Two styles:
//!
//! * [`Style::Journal`] when stderr is connected to journald (systemd sets `JOURNAL_STREAM` to the
//!   `<st_dev>:<st_ino>` of the stream it hands us, and we check that stderr is still that stream,
//!   so a child whose stderr was redirected does not inherit the choice). Each line starts with the
//!   sd-daemon(3) priority prefix `<N>` and has no timestamp, since journald adds both; then
//!   `journalctl -p warning -u kr-tunneld` works.
//! * [`Style::Plain`] otherwise: `2026-11-26T21:23:05.123Z WARN  target: message`, UTC computed
//!   here (no date crate: one civil-from-days conversion is all that is needed).
//!
//! Must never: write anything but stderr, or panic on any record.

use std::fmt::Arguments;
use std::io::{self, Write};
use std::time::{SystemTime, UNIX_EPOCH};

use log::{Level, LevelFilter, Record};

/// How a log line looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// `<N>target: message`, for journald (N is the syslog priority).
    Journal,
    /// `YYYY-MM-DDTHH:MM:SS.mmmZ LEVEL target: message`, for a terminal or a file.
    Plain,
}

/// Installs the global logger on stderr.
///
/// `level` is `--log-level`: when given it sets the level of kr-tunneld's own modules, and other
/// crates (ureq, rustls) log at most at info, so `--log-level=trace` shows netlink hex dumps but
/// not TLS internals. When `level` is `None`, `RUST_LOG` is used with env_logger's syntax
/// (`info`, `kr_tunneld::netlink=trace,ureq=debug`, …); when that is unset too, info.
///
/// Calling it again (tests) keeps the first logger.
pub fn init(level: Option<LevelFilter>) {
    let rust_log = std::env::var("RUST_LOG").ok();
    let style = detect_style();
    // Only fails when a logger is already installed; the first one stays.
    let _ = builder(level, rust_log.as_deref(), style).try_init();
}

/// The env_logger builder for a level (`--log-level`), a `RUST_LOG` value and a style. Pure;
/// [`init`] installs what it returns.
pub fn builder(
    level: Option<LevelFilter>,
    rust_log: Option<&str>,
    style: Style,
) -> env_logger::Builder {
    let mut b = env_logger::Builder::new();
    match (level, rust_log) {
        (Some(level), _) => {
            b.filter_level(level.min(LevelFilter::Info));
            b.filter_module("kr_tunneld", level);
        }
        (None, Some(spec)) if !spec.trim().is_empty() => {
            b.parse_filters(spec);
        }
        (None, _) => {
            b.filter_level(LevelFilter::Info);
        }
    }
    b.format(move |buf, record| {
        if is_secret_bearing(record.level(), record.target()) {
            return Ok(());
        }
        format_record(buf, style, SystemTime::now(), record)
    });
    b
}

/// Records that may carry credentials whatever the filter says: ureq-proto hex-dumps whole
/// requests (the `Authorization` header included) at trace, and rustls traces handshake
/// internals. They are dropped, so `RUST_LOG=trace` can never leak the bearer token (SPEC K-2).
pub fn is_secret_bearing(level: log::Level, target: &str) -> bool {
    level == log::Level::Trace && (target.starts_with("ureq") || target.starts_with("rustls"))
}

/// The style for this process: [`Style::Journal`] when `JOURNAL_STREAM` names our stderr.
pub fn detect_style() -> Style {
    match std::env::var("JOURNAL_STREAM") {
        Ok(js) if stderr_id().is_some_and(|(dev, ino)| journal_stream_matches(&js, dev, ino)) => {
            Style::Journal
        }
        _ => Style::Plain,
    }
}

/// Writes an error found before [`init`] (usage, configuration) to stderr as `kr-tunneld: MSG`,
/// with the error priority `<3>` on every line when stderr is the journal, so that
/// `journalctl -p warning` shows why the unit failed.
pub fn early_error(msg: &str) {
    let prefix = match detect_style() {
        Style::Journal => "<3>",
        Style::Plain => "",
    };
    let mut text = String::new();
    for line in format!("kr-tunneld: {msg}").lines() {
        text.push_str(prefix);
        text.push_str(line);
        text.push('\n');
    }
    // Nothing to do if stderr is gone.
    let _ = io::stderr().write_all(text.as_bytes());
}

/// `(st_dev, st_ino)` of stderr, by fstat(2) on a duplicate of the descriptor.
fn stderr_id() -> Option<(u64, u64)> {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let fd = io::stderr().as_fd().try_clone_to_owned().ok()?;
    let md = std::fs::File::from(fd).metadata().ok()?;
    Some((md.dev(), md.ino()))
}

/// Whether a `JOURNAL_STREAM` value (`"<dev>:<ino>"`, both decimal, see systemd.exec(5)) names the
/// file with this device and inode number. Pure.
pub fn journal_stream_matches(journal_stream: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = journal_stream.trim().split_once(':') else {
        return false;
    };
    d.parse() == Ok(dev) && i.parse() == Ok(ino)
}

/// The sd-daemon(3) / syslog priority of a level: error 3, warn 4, info 6, debug and trace 7.
/// (notice, 5, has no `log` level.)
pub fn journal_priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// Writes one record, ending in a newline. Pure apart from writing to `w`; `now` is the time to
/// print in [`Style::Plain`] (ignored for the journal, which stamps lines itself).
///
/// In the journal style every line of a multi-line message gets the priority prefix, because
/// journald makes a separate entry of each line and would give an unprefixed one the default
/// priority (info).
pub fn format_record(
    w: &mut dyn Write,
    style: Style,
    now: SystemTime,
    record: &Record<'_>,
) -> io::Result<()> {
    format_line(
        w,
        style,
        now,
        record.level(),
        record.target(),
        record.args(),
    )
}

/// [`format_record`] on the parts of a record.
pub fn format_line(
    w: &mut dyn Write,
    style: Style,
    now: SystemTime,
    level: Level,
    target: &str,
    args: &Arguments<'_>,
) -> io::Result<()> {
    match style {
        Style::Journal => {
            let p = journal_priority(level);
            let msg = args.to_string();
            let mut lines = msg.split('\n');
            // split always yields at least one item, even for ""
            let first = lines.next().unwrap_or("");
            writeln!(w, "<{p}>{target}: {first}")?;
            for line in lines {
                writeln!(w, "<{p}>{line}")?;
            }
            Ok(())
        }
        Style::Plain => {
            writeln!(
                w,
                "{} {:<5} {target}: {args}",
                rfc3339_millis(now),
                level.as_str()
            )
        }
    }
}

/// `now` as `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC, milliseconds, truncated). Times before 1970 print as
/// the epoch. Pure.
pub fn rfc3339_millis(now: SystemTime) -> String {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Proleptic Gregorian (year, month, day) of a day count since 1970-01-01.
///
/// Howard Hinnant's `civil_from_days` ("chrono-Compatible Low-Level Date Algorithms"), reduced to
/// non-negative days: shift the epoch to 0000-03-01 so the leap day ends the year, split into
/// 400-year eras of 146,097 days, then year-of-era, day-of-year and a month from March.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097; // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], 0 = March
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(secs: u64, millis: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis)
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339_millis(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339_millis(at(951_782_400, 7)),
            "2000-02-29T00:00:00.007Z"
        );
        assert_eq!(
            rfc3339_millis(at(951_868_799, 999)),
            "2000-02-29T23:59:59.999Z"
        );
        assert_eq!(
            rfc3339_millis(at(1_709_251_199, 0)),
            "2024-02-29T23:59:59.000Z"
        );
        assert_eq!(
            rfc3339_millis(at(1_798_761_599, 500)),
            "2026-12-31T23:59:59.500Z"
        );
        assert_eq!(
            rfc3339_millis(at(4_107_542_400, 0)),
            "2100-03-01T00:00:00.000Z"
        );
        assert_eq!(
            rfc3339_millis(UNIX_EPOCH - Duration::from_secs(5)),
            "1970-01-01T00:00:00.000Z"
        );
    }

    /// Every day from 1970 to 2400 against a naive day-by-day calendar walk.
    #[test]
    fn civil_from_days_matches_calendar_walk() {
        let leap = |y: u64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
        let (mut y, mut m, mut d) = (1970, 1, 1);
        for days in 0..157_000 {
            assert_eq!(civil_from_days(days), (y, m, d), "day {days}");
            let len = match m {
                2 if leap(y) => 29,
                2 => 28,
                4 | 6 | 9 | 11 => 30,
                _ => 31,
            };
            d += 1;
            if d > len {
                d = 1;
                m += 1;
                if m > 12 {
                    m = 1;
                    y += 1;
                }
            }
        }
    }

    fn line(style: Style, level: Level, msg: &str) -> String {
        let mut out = Vec::new();
        format_line(
            &mut out,
            style,
            at(1_764_192_185, 123),
            level,
            "kr_tunneld::apply",
            &format_args!("{msg}"),
        )
        .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn journal_lines() {
        assert_eq!(
            line(Style::Journal, Level::Error, "e"),
            "<3>kr_tunneld::apply: e\n"
        );
        assert_eq!(
            line(Style::Journal, Level::Warn, "w"),
            "<4>kr_tunneld::apply: w\n"
        );
        assert_eq!(
            line(Style::Journal, Level::Info, "i"),
            "<6>kr_tunneld::apply: i\n"
        );
        assert_eq!(
            line(Style::Journal, Level::Debug, "d"),
            "<7>kr_tunneld::apply: d\n"
        );
        assert_eq!(
            line(Style::Journal, Level::Trace, "t"),
            "<7>kr_tunneld::apply: t\n"
        );
        assert_eq!(
            line(Style::Journal, Level::Warn, "a\nb"),
            "<4>kr_tunneld::apply: a\n<4>b\n"
        );
    }

    #[test]
    fn plain_lines() {
        assert_eq!(
            line(Style::Plain, Level::Warn, "skipped node a"),
            "2025-11-26T21:23:05.123Z WARN  kr_tunneld::apply: skipped node a\n"
        );
        assert_eq!(
            line(Style::Plain, Level::Error, "x"),
            "2025-11-26T21:23:05.123Z ERROR kr_tunneld::apply: x\n"
        );
    }

    #[test]
    fn journal_stream_values() {
        assert!(journal_stream_matches("8:12345", 8, 12345));
        assert!(journal_stream_matches("8:12345\n", 8, 12345));
        assert!(!journal_stream_matches("8:12346", 8, 12345));
        assert!(!journal_stream_matches("9:12345", 8, 12345));
        assert!(!journal_stream_matches("", 8, 12345));
        assert!(!journal_stream_matches("8", 8, 12345));
        assert!(!journal_stream_matches("8:x", 8, 12345));
    }

    fn enabled(logger: &env_logger::Logger, level: Level, target: &str) -> bool {
        logger.matches(
            &Record::builder()
                .level(level)
                .target(target)
                .args(format_args!("m"))
                .build(),
        )
    }

    #[test]
    fn level_flag_wins_over_rust_log() {
        let l = builder(Some(LevelFilter::Debug), Some("error"), Style::Plain).build();
        assert!(enabled(&l, Level::Debug, "kr_tunneld::apply"));
        assert!(!enabled(&l, Level::Trace, "kr_tunneld::apply"));
        // other crates are capped at info
        assert!(enabled(&l, Level::Info, "ureq::unversioned"));
        assert!(!enabled(&l, Level::Debug, "ureq::unversioned"));

        let l = builder(Some(LevelFilter::Warn), None, Style::Plain).build();
        assert!(!enabled(&l, Level::Info, "kr_tunneld"));
        assert!(!enabled(&l, Level::Info, "rustls"));
        assert!(enabled(&l, Level::Warn, "rustls"));
    }

    #[test]
    fn rust_log_used_without_flag() {
        let l = builder(None, Some("warn,kr_tunneld::netlink=trace"), Style::Plain).build();
        assert!(!enabled(&l, Level::Info, "kr_tunneld::apply"));
        assert!(enabled(&l, Level::Trace, "kr_tunneld::netlink::socket"));
        assert!(enabled(&l, Level::Warn, "ureq"));
    }

    #[test]
    fn default_is_info() {
        for rust_log in [None, Some(""), Some("  ")] {
            let l = builder(None, rust_log, Style::Plain).build();
            assert!(enabled(&l, Level::Info, "kr_tunneld"));
            assert!(!enabled(&l, Level::Debug, "kr_tunneld"));
        }
    }
}
