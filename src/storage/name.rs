//! Names on disk: the stream-name rule, in one place (names become directory names under
//! `streams/`, so the API refuses any other name and recovery skips any other directory), and
//! how a file is named to API clients (what it is, never the host's path).

use std::path::Path;

/// Whether `name` is a stream name: 1 to 64 characters of `A-Z a-z 0-9 _ . -`, and not `.` or
/// `..`.
pub fn is_valid_stream_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && name != "."
        && name != ".."
}

/// The rule in words, for error messages.
pub const STREAM_NAME_RULE: &str =
    "stream names are 1 to 64 characters of A-Z a-z 0-9 _ . - (and not `.` or `..`)";

/// What `path` is, for a message to API clients: the kind of file and its name inside its
/// stream's directory, without the host's path (which goes to the daemon's log only).
pub fn describe_file(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let parent = path
        .parent()
        .and_then(Path::file_name)
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let numbered = |prefix: &str, suffixes: &[&str]| {
        name.strip_prefix(prefix).is_some_and(|rest| {
            suffixes.iter().any(|s| {
                rest.strip_suffix(s)
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            })
        })
    };
    if name == "options.json" || name == "options.tmp" {
        format!("its options file ({name})")
    } else if numbered("wal-", &[".log"]) {
        format!("log segment {name}")
    } else if numbered("snapshot-", &[".bin", ".tmp"]) {
        format!("snapshot {name}")
    } else if name == "streams" || name == "trash" {
        format!("the data directory's `{name}` directory")
    } else if parent == "streams" {
        "the stream's directory".to_owned()
    } else if parent == "trash" {
        "the trash directory".to_owned()
    } else {
        "a file in the data directory".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule() {
        for ok in ["a", "A-b_c.d", "..a", &"x".repeat(64)] {
            assert!(is_valid_stream_name(ok), "{ok:?}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a b",
            "a/b",
            "bad name!",
            "new\nline",
            "é",
            &"x".repeat(65),
        ] {
            assert!(!is_valid_stream_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn files_are_described_without_their_path() {
        let root = Path::new("/srv/secret/data");
        for (p, want) in [
            ("streams/a/wal-00000000000000000001.log", "log segment wal-"),
            ("streams/a/options.json", "options file (options.json)"),
            ("streams/a/snapshot-00000000000000000009.bin", "snapshot "),
            ("streams/a", "the stream's directory"),
            ("trash/a.123", "the trash directory"),
            ("streams", "`streams` directory"),
        ] {
            let d = describe_file(&root.join(p));
            assert!(d.contains(want) && !d.contains("secret"), "{p}: {d}");
        }
    }
}
