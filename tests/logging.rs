//! Logging (SPEC O-3): the journal format carries sd-daemon priority prefixes and no time, the
//! plain format a UTC timestamp; `init` picks the journal format only when JOURNAL_STREAM names
//! the file that stderr really is (checked in a child process whose stderr is a file).

use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};
use std::time::SystemTime;

use kr_tunneld::logging::{format_record, Style};
use log::{Level, Record};

fn format(style: Style, level: Level, msg: &str) -> String {
    let mut out = Vec::new();
    let args = format_args!("{msg}");
    let record = Record::builder()
        .level(level)
        .target("kr_tunneld::nodes")
        .args(args)
        .build();
    format_record(&mut out, style, SystemTime::now(), &record).unwrap();
    String::from_utf8(out).unwrap()
}

#[test]
fn journal_warning_has_priority_4() {
    assert_eq!(
        format(
            Style::Journal,
            Level::Warn,
            "node a: bad pod CIDR x, skipped"
        ),
        "<4>kr_tunneld::nodes: node a: bad pod CIDR x, skipped\n"
    );
    assert!(format(Style::Journal, Level::Error, "e").starts_with("<3>"));
    assert!(format(Style::Journal, Level::Info, "i").starts_with("<6>"));
    assert!(format(Style::Journal, Level::Debug, "d").starts_with("<7>"));
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` at the start of a line.
fn assert_timestamp(line: &str) {
    let ts: Vec<char> = line.chars().take(24).collect();
    assert_eq!(ts.len(), 24, "{line:?}");
    for (i, c) in ts.iter().enumerate() {
        let want = match i {
            4 | 7 => '-',
            10 => 'T',
            13 | 16 => ':',
            19 => '.',
            23 => 'Z',
            _ => '0',
        };
        if want == '0' {
            assert!(c.is_ascii_digit(), "{line:?} at {i}");
        } else {
            assert_eq!(*c, want, "{line:?} at {i}");
        }
    }
    let year: u32 = line[..4].parse().unwrap();
    assert!(year >= 2024, "{line:?}");
}

#[test]
fn plain_line_has_timestamp() {
    let line = format(Style::Plain, Level::Warn, "w");
    assert_timestamp(&line);
    assert_eq!(&line[24..], " WARN  kr_tunneld::nodes: w\n");
}

// --- init() in a child process ---

const CHILD: &str = "KR_TUNNELD_TEST_LOGGING_CHILD";

/// Child side: only acts when re-run by the tests below.
#[test]
fn child_logs_after_init() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    kr_tunneld::logging::init(None);
    log::warn!(target: "kr_tunneld::test", "a warning");
    log::info!(target: "kr_tunneld::test", "an info line");
    log::debug!(target: "kr_tunneld::test", "a debug line");
}

/// Runs the child with stderr going to a file; `journal` sets JOURNAL_STREAM to that file's
/// device and inode (or, with `Some(false)`, to another file's). Returns what it logged.
fn child_stderr(journal: Option<bool>, rust_log: Option<&str>) -> String {
    let dir = std::env::temp_dir();
    let path = dir.join(format!(
        "kr-logging-{}-{journal:?}-{rust_log:?}",
        std::process::id()
    ));
    let file = std::fs::File::create(&path).unwrap();
    let md = file.metadata().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(&exe);
    cmd.args([
        "--exact",
        "logging::child_logs_after_init",
        "--test-threads=1",
        "--nocapture",
    ]);
    cmd.env(CHILD, "1")
        .env_remove("JOURNAL_STREAM")
        .env_remove("RUST_LOG");
    match journal {
        Some(true) => cmd.env("JOURNAL_STREAM", format!("{}:{}", md.dev(), md.ino())),
        // the test binary itself: a real file, but not stderr
        Some(false) => {
            let other = std::fs::metadata(&exe).unwrap();
            cmd.env("JOURNAL_STREAM", format!("{}:{}", other.dev(), other.ino()))
        }
        None => &mut cmd,
    };
    if let Some(r) = rust_log {
        cmd.env("RUST_LOG", r);
    }
    let status = cmd.stdout(Stdio::null()).stderr(file).status().unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(status.success(), "child failed: {text}");
    text
}

#[test]
fn init_uses_journal_format_when_stderr_is_the_journal_stream() {
    let text = child_stderr(Some(true), None);
    assert_eq!(
        text,
        "<4>kr_tunneld::test: a warning\n<6>kr_tunneld::test: an info line\n"
    );
}

#[test]
fn init_uses_plain_format_otherwise() {
    for journal in [None, Some(false)] {
        let text = child_stderr(journal, None);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_timestamp(lines[0]);
        assert!(
            lines[0].ends_with(" WARN  kr_tunneld::test: a warning"),
            "{text}"
        );
        assert!(
            lines[1].ends_with(" INFO  kr_tunneld::test: an info line"),
            "{text}"
        );
    }
}

#[test]
fn init_honours_rust_log() {
    let text = child_stderr(Some(true), Some("warn"));
    assert_eq!(text, "<4>kr_tunneld::test: a warning\n");
    let text = child_stderr(Some(true), Some("kr_tunneld=debug"));
    assert!(
        text.ends_with("<7>kr_tunneld::test: a debug line\n"),
        "{text}"
    );
}

/// The real binary with stderr going to a file named by JOURNAL_STREAM (as under systemd) and
/// `env`/`args`: its exit status and what it wrote to stderr.
fn binary_under_journal(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let path = std::env::temp_dir().join(format!(
        "kr-logging-bin-{}-{}",
        std::process::id(),
        args.len() + env.len()
    ));
    let file = std::fs::File::create(&path).unwrap();
    let md = file.metadata().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kr-tunneld"));
    cmd.args(args)
        .env_remove("RUST_LOG")
        .env("JOURNAL_STREAM", format!("{}:{}", md.dev(), md.ino()));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let status = cmd.stdout(Stdio::null()).stderr(file).status().unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    (status.code(), text)
}

/// SPEC O-3, issue 12: configuration and usage errors are found before logging is set up; under
/// systemd they still carry the error priority on every line, so `journalctl -p warning` shows
/// them.
#[test]
fn configuration_errors_carry_priority_3_under_journald() {
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)]);
    let cases: [Case; 3] = [
        (&[], &[("KR_TUNNELD_OVERLAY_TYPE", "bogus")]),
        (&["--no-such-flag"], &[]),
        (&["--overlay-encap-port=1"], &[]),
    ];
    for (args, env) in cases {
        let (code, text) = binary_under_journal(args, env);
        assert_eq!(code, Some(2), "{args:?} {env:?}: {text}");
        assert!(!text.is_empty(), "{args:?} {env:?}: nothing on stderr");
        for line in text.lines() {
            assert!(
                line.starts_with("<3>"),
                "{args:?} {env:?}: line without the error priority: {line:?}\n{text}"
            );
        }
    }
}
