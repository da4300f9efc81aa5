//! Rules of the architecture that can be checked by reading the source:
//!
//! - the engine (`src/engine/`) does no I/O, reads no clock and starts no threads outside its
//!   step pool: it is a function of its inputs and its stream's seed;
//! - each part imports only from the parts below it: engine < storage < eval < cluster < server < cli
//!   (nothing runs back up).
//!
//! Comments and the insides of string and character literals are blanked out before any
//! pattern is looked for, and `use a::{b, c}` is read as `a::b` and `a::c`, so a grouped
//! import cannot hide a path.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Something the engine's code must not contain.
struct Rule {
    pattern: &'static str,
    why: &'static str,
    /// The engine files (paths under `src/engine/`) where it is allowed, each with its reason.
    allowed_in: &'static [Allowed],
    /// Whether test code (`#[cfg(test)]` items, files named `tests.rs`) is held to it too.
    in_tests: bool,
}

/// A file under `src/engine/` where a rule does not apply, and why.
type Allowed = (&'static str, &'static str);

/// The step pool's file declares the pool (a rayon `ThreadPoolBuilder`, built once, its
/// workers named `ekid-step-N`) and runs the halves of a split step on it with `rayon::join`:
/// the one place the engine may start threads.
const STEP_POOL: Allowed = (
    "ensemble/parallel.rs",
    "declares the step pool, the only threads the engine starts",
);

/// If the operating system refuses the pool's threads, steps stay serial, and the pool says
/// so where it finds out (there is no caller to return the error to: the pool is built lazily
/// on the first split step).
const STEP_POOL_WARNING: Allowed = (
    "ensemble/parallel.rs",
    "warns once that the OS refused the step pool's threads (steps then stay serial)",
);

/// Particle buffers of large ensembles are anonymous memory maps (no file behind them) with
/// huge-page advice; a refused advice is logged at debug level and changes nothing else.
const PARTICLE_MAPS: Allowed = (
    "ensemble/buffer.rs",
    "maps anonymous memory for particle buffers (no file behind it)",
);
const HUGE_PAGE_NOTE: Allowed = (
    "ensemble/buffer.rs",
    "logs at debug level that huge pages were refused (the mapping works without them)",
);

const NO_IO: &str = "the engine does no I/O: storage and server do it, and hand it values";
const NO_LOG: &str = "the engine reports through its return values; its callers log";
const NO_CLOCK: &str = "the engine reads no clock: its results depend on its inputs only";
const NO_THREADS: &str = "the engine starts threads only in its step pool";

#[rustfmt::skip]
const ENGINE_RULES: &[Rule] = &[
    // I/O, test code included (the engine's tests need no files or sockets either).
    Rule { pattern: "std::fs", why: NO_IO, allowed_in: &[], in_tests: true },
    Rule { pattern: "std::net", why: NO_IO, allowed_in: &[], in_tests: true },
    Rule { pattern: "std::io", why: NO_IO, allowed_in: &[], in_tests: true },
    Rule { pattern: "std::process", why: NO_IO, allowed_in: &[], in_tests: true },
    Rule { pattern: "std::env", why: NO_IO, allowed_in: &[], in_tests: true },
    Rule { pattern: "env::var", why: NO_IO, allowed_in: &[], in_tests: true },
    Rule { pattern: "File::", why: NO_IO, allowed_in: &[], in_tests: true },
    Rule { pattern: "OpenOptions", why: NO_IO, allowed_in: &[], in_tests: true },
    Rule { pattern: "TcpStream", why: NO_IO, allowed_in: &[], in_tests: true },
    Rule { pattern: "UdpSocket", why: NO_IO, allowed_in: &[], in_tests: true },
    Rule { pattern: "tokio", why: NO_IO, allowed_in: &[], in_tests: true },
    Rule { pattern: "reqwest", why: NO_IO, allowed_in: &[], in_tests: true },
    Rule { pattern: "println!", why: NO_IO, allowed_in: &[], in_tests: true },
    Rule { pattern: "eprintln!", why: NO_IO, allowed_in: &[], in_tests: true },
    Rule { pattern: "print!", why: NO_IO, allowed_in: &[], in_tests: true },
    Rule { pattern: "dbg!", why: NO_IO, allowed_in: &[], in_tests: true },
    // File-backed maps are I/O; anonymous ones are memory.
    Rule { pattern: "Mmap::map(", why: NO_IO, allowed_in: &[], in_tests: true },
    Rule { pattern: "MmapMut::map(", why: NO_IO, allowed_in: &[], in_tests: true },
    Rule { pattern: "MmapOptions", why: NO_IO, allowed_in: &[], in_tests: true },
    Rule { pattern: "memmap2", why: NO_IO, allowed_in: &[PARTICLE_MAPS], in_tests: true },
    Rule { pattern: "tracing::", why: NO_LOG, allowed_in: &[STEP_POOL_WARNING, HUGE_PAGE_NOTE], in_tests: true },
    // The clock. Tests may time-box a step (a thread and a channel with a timeout).
    Rule { pattern: "std::time", why: NO_CLOCK, allowed_in: &[], in_tests: false },
    Rule { pattern: "Instant::now", why: NO_CLOCK, allowed_in: &[], in_tests: false },
    Rule { pattern: "SystemTime", why: NO_CLOCK, allowed_in: &[], in_tests: false },
    Rule { pattern: "UNIX_EPOCH", why: NO_CLOCK, allowed_in: &[], in_tests: false },
    Rule { pattern: "thread::sleep", why: NO_CLOCK, allowed_in: &[], in_tests: false },
    // Threads. Tests may start one, or build a one-thread pool to run a step on.
    Rule { pattern: "thread::spawn", why: NO_THREADS, allowed_in: &[], in_tests: false },
    Rule { pattern: "thread::Builder", why: NO_THREADS, allowed_in: &[], in_tests: false },
    Rule { pattern: "thread::scope", why: NO_THREADS, allowed_in: &[], in_tests: false },
    Rule { pattern: "spawn_blocking", why: NO_THREADS, allowed_in: &[], in_tests: false },
    Rule { pattern: "rayon::spawn", why: NO_THREADS, allowed_in: &[], in_tests: false },
    Rule { pattern: "rayon::scope", why: NO_THREADS, allowed_in: &[], in_tests: false },
    Rule { pattern: "ThreadPoolBuilder", why: NO_THREADS, allowed_in: &[STEP_POOL], in_tests: false },
    // Anything else of rayon (its global pool: par_iter, join outside the step pool).
    Rule { pattern: "rayon", why: NO_THREADS, allowed_in: &[STEP_POOL], in_tests: false },
];

/// The parts, lowest first: each may import only from the ones before it.
const LAYERS: &[&str] = &["engine", "storage", "eval", "cluster", "server", "cli"];

#[test]
fn the_engine_does_no_io_reads_no_clock_and_starts_threads_only_in_its_pool() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src")
        .join("engine");
    let mut report = String::new();
    let mut files = 0;
    for path in rust_files(&root) {
        let rel = relative(&path, &root);
        let source = std::fs::read_to_string(&path).expect("read source");
        for v in engine_violations(&rel, &source) {
            writeln!(report, "src/engine/{v}").expect("write");
        }
        files += 1;
    }
    assert!(files > 10, "found only {files} engine files under {root:?}");
    assert!(report.is_empty(), "\n{report}");
}

#[test]
fn each_part_imports_only_from_the_parts_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut report = String::new();
    let mut files = 0;
    for path in rust_files(&src) {
        let rel = relative(&path, &src);
        let Some(layer) = LAYERS
            .iter()
            .position(|l| rel.starts_with(&format!("{l}/")))
        else {
            continue; // lib.rs, main.rs: the crate root sees every part
        };
        let source = std::fs::read_to_string(&path).expect("read source");
        for v in layer_violations(&rel, layer, &source) {
            writeln!(report, "src/{v}").expect("write");
        }
        files += 1;
    }
    assert!(files > 30, "found only {files} files under {src:?}");
    assert!(report.is_empty(), "\n{report}");
}

/// `file:line: what` for each line of the engine file `rel` (a path under `src/engine/`) that
/// breaks a rule.
fn engine_violations(rel: &str, source: &str) -> Vec<String> {
    let lines = code_lines(source);
    let test = test_lines(rel, &lines);
    let mut out = Vec::new();
    for (n, text) in statements(&lines) {
        for rule in ENGINE_RULES {
            if !text.contains(rule.pattern)
                || (test[n] && !rule.in_tests)
                || rule.allowed_in.iter().any(|(file, _)| *file == rel)
            {
                continue;
            }
            out.push(format!(
                "{rel}:{}: `{}`: {}\n    {}",
                n + 1,
                rule.pattern,
                rule.why,
                source.lines().nth(n).unwrap_or("").trim()
            ));
        }
    }
    out
}

/// `file:line: what` for each line of `rel` (a path under `src/`, in part `LAYERS[layer]`)
/// that names a part above it, as `crate::part` or through enough `super::`s.
fn layer_violations(rel: &str, layer: usize, source: &str) -> Vec<String> {
    let depth = module_depth(rel);
    let mut out = Vec::new();
    for (n, text) in statements(&code_lines(source)) {
        for (k, above) in LAYERS.iter().enumerate().skip(layer + 1) {
            let supers = "super::".repeat(depth);
            if text.contains(&format!("crate::{above}"))
                || text.contains(&format!("{supers}{above}"))
            {
                out.push(format!(
                    "{rel}:{}: {} imports from {} (a part above it)\n    {}",
                    n + 1,
                    LAYERS[layer],
                    LAYERS[k],
                    source.lines().nth(n).unwrap_or("").trim()
                ));
            }
        }
    }
    out
}

/// How many `super::` reach the crate root from the file `rel` (a path under `src/`):
/// `engine/mod.rs` 1, `engine/forecast.rs` 2, `engine/ensemble/tests.rs` 3. Inline modules
/// are not counted, so a `super::` chain from one is taken to reach higher than it does: a
/// false alarm at worst, never a miss.
fn module_depth(rel: &str) -> usize {
    let parts: Vec<&str> = rel.split('/').collect();
    match parts.last() {
        Some(&"mod.rs") => parts.len() - 1,
        _ => parts.len(),
    }
}

/// The code of each line: comments and the insides of string and character literals are
/// blanked out (their delimiters stay), so that neither a pattern nor a brace is found in
/// them. Lines keep their numbers.
fn code_lines(source: &str) -> Vec<String> {
    #[derive(Clone, Copy, PartialEq)]
    enum In {
        Code,
        LineComment,
        BlockComment(usize),
        Str,
        RawStr(usize),
    }
    let chars: Vec<char> = source.chars().collect();
    let mut out = String::with_capacity(source.len());
    let mut state = In::Code;
    let mut i = 0;
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '\n' {
            if state == In::LineComment {
                state = In::Code;
            }
            out.push('\n');
            i += 1;
            continue;
        }
        match state {
            In::Code => {
                if c == '/' && next == Some('/') {
                    state = In::LineComment;
                    out.push(' ');
                } else if c == '/' && next == Some('*') {
                    state = In::BlockComment(1);
                    out.push_str("  ");
                    i += 1;
                } else if c == '"' {
                    state = In::Str;
                    out.push('"');
                } else if c == 'r'
                    && (i == 0
                        || !ident(chars[i - 1])
                        || (chars[i - 1] == 'b' && (i < 2 || !ident(chars[i - 2]))))
                    && matches!(next, Some('"') | Some('#'))
                {
                    // r"..." or r#"..."#: count the hashes up to the quote.
                    let hashes = chars[i + 1..].iter().take_while(|&&h| h == '#').count();
                    if chars.get(i + 1 + hashes) == Some(&'"') {
                        state = In::RawStr(hashes);
                        out.push('r');
                        out.extend(std::iter::repeat_n('#', hashes));
                        out.push('"');
                        i += hashes + 2;
                        continue;
                    }
                    out.push(c);
                } else if c == '\'' {
                    // A character literal ('x', '\n', '\u{7f}'), or a lifetime ('a): a
                    // literal closes within a few characters, a lifetime never.
                    // The character after a backslash is escaped, even a quote ('\'').
                    let close = if next == Some('\\') {
                        let from = (i + 3).min(chars.len());
                        chars[from..]
                            .iter()
                            .position(|&q| q == '\'')
                            .map(|p| from + p)
                    } else if chars.get(i + 2) == Some(&'\'') {
                        Some(i + 2)
                    } else {
                        None
                    };
                    match close {
                        Some(end) => {
                            out.push('\'');
                            out.extend(std::iter::repeat_n(' ', end - i - 1));
                            out.push('\'');
                            i = end + 1;
                            continue;
                        }
                        None => out.push(c),
                    }
                } else {
                    out.push(c);
                }
            }
            In::LineComment => out.push(' '),
            In::BlockComment(depth) => {
                if c == '*' && next == Some('/') {
                    state = if depth == 1 {
                        In::Code
                    } else {
                        In::BlockComment(depth - 1)
                    };
                    out.push_str("  ");
                    i += 1;
                } else if c == '/' && next == Some('*') {
                    state = In::BlockComment(depth + 1);
                    out.push_str("  ");
                    i += 1;
                } else {
                    out.push(' ');
                }
            }
            In::Str => {
                if c == '\\' {
                    out.push(' ');
                    if next.is_some_and(|n| n != '\n') {
                        out.push(' ');
                        i += 1;
                    }
                } else if c == '"' {
                    state = In::Code;
                    out.push('"');
                } else {
                    out.push(' ');
                }
            }
            In::RawStr(hashes) => {
                let closes = c == '"'
                    && chars[i + 1..]
                        .iter()
                        .take(hashes)
                        .filter(|&&h| h == '#')
                        .count()
                        == hashes;
                if closes {
                    state = In::Code;
                    out.push('"');
                    out.extend(std::iter::repeat_n('#', hashes));
                    i += hashes + 1;
                    continue;
                }
                out.push(' ');
            }
        }
        i += 1;
    }
    out.lines().map(str::to_owned).collect()
}

/// Which lines are test code: all of a file named `tests.rs`, and every item under a
/// `#[cfg(test)]` attribute (a module, an impl, a function), up to its closing brace.
fn test_lines(rel: &str, lines: &[String]) -> Vec<bool> {
    if rel == "tests.rs" || rel.ends_with("/tests.rs") {
        return vec![true; lines.len()];
    }
    let mut test = vec![false; lines.len()];
    let mut n = 0;
    while n < lines.len() {
        if lines[n].trim() != "#[cfg(test)]" {
            n += 1;
            continue;
        }
        // The item: to its `;` if it has no body (`mod tests;`), else to its closing brace.
        let mut depth = 0i64;
        let mut opened = false;
        let start = n;
        while n < lines.len() {
            for c in lines[n].chars() {
                match c {
                    '{' => {
                        depth += 1;
                        opened = true;
                    }
                    '}' => depth -= 1,
                    _ => {}
                }
            }
            let ends = if opened {
                depth == 0
            } else {
                n > start && lines[n].trim_end().ends_with(';')
            };
            test[n] = true;
            n += 1;
            if ends {
                break;
            }
        }
    }
    test
}

/// The lines to look at, each with its (0-based) number: every line of code, except that a
/// `use` declaration is joined up to its `;` and its groups spelled out, one path after the
/// other (`use std::{fs, io::Write};` reads `std::fs std::io::Write`), on its first line.
fn statements(lines: &[String]) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut n = 0;
    while n < lines.len() {
        let t = lines[n].trim_start();
        let is_use = t.starts_with("use ") || (t.starts_with("pub") && t.contains(" use "));
        if !is_use {
            out.push((n, lines[n].clone()));
            n += 1;
            continue;
        }
        let start = n;
        let mut decl = String::new();
        while n < lines.len() {
            decl.push_str(&lines[n]);
            decl.push(' ');
            n += 1;
            if decl.contains(';') {
                break;
            }
        }
        let body = decl.split_once("use ").map_or("", |(_, b)| b);
        let body = body.split(';').next().unwrap_or("");
        let compact: String = body.chars().filter(|c| !c.is_whitespace()).collect();
        out.push((start, expand(&compact).join(" ")));
    }
    out
}

/// The paths a `use` tree names: `a::{b,c::{d,e}}` gives `a::b`, `a::c::d`, `a::c::e`.
fn expand(tree: &str) -> Vec<String> {
    let Some(open) = tree.find('{') else {
        return vec![tree.to_owned()];
    };
    let prefix = &tree[..open];
    let inner = tree[open + 1..]
        .strip_suffix('}')
        .unwrap_or(&tree[open + 1..]);
    let mut items = Vec::new();
    let (mut depth, mut from) = (0, 0);
    for (k, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&inner[from..k]);
                from = k + 1;
            }
            _ => {}
        }
    }
    items.push(&inner[from..]);
    items
        .into_iter()
        .filter(|item| !item.is_empty())
        .flat_map(|item| {
            expand(item)
                .into_iter()
                .map(move |p| format!("{prefix}{p}"))
        })
        .collect()
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {dir:?}: {e}"))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
    out
}

fn relative(path: &Path, root: &Path) -> String {
    let rel = path.strip_prefix(root).expect("under the root");
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

// The checks themselves, on small made-up sources: what must be found is found, and what
// only looks like it (in a comment, a string, test code, an allowed file) is not.

#[test]
fn a_forbidden_call_in_engine_code_is_found_with_its_file_and_line() {
    let src = "fn f() {\n    let t = std::time::Instant::now();\n}\n";
    let found = engine_violations("forecast.rs", src);
    assert_eq!(found.len(), 2, "{found:?}"); // std::time and Instant::now
    assert!(
        found[0].starts_with("forecast.rs:2: `std::time`"),
        "{found:?}"
    );
    assert!(
        found[0].ends_with("let t = std::time::Instant::now();"),
        "{found:?}"
    );
}

#[test]
fn comments_strings_and_characters_are_not_code() {
    let src = concat!(
        "// std::fs in a comment\n",
        "/* tokio\n   in a block */ fn f() {}\n",
        "const A: &str = \"std::net::TcpStream\";\n",
        "const B: &str = r#\"println!(\"x\")\"#;\n",
        "const C: char = '\"'; const D: &str = \"std::fs\";\n",
        "const E: char = '\\''; const F: &str = \"tokio\";\n",
        "fn g<'a>(x: &'a str) -> &'a str { x } // thread::spawn\n",
    );
    assert_eq!(engine_violations("model.rs", src), Vec::<String>::new());
    // ... and code after a literal on the same line still is.
    let src = "const C: char = '{'; fn f() { std::fs::read(\"x\"); }\n";
    assert_eq!(engine_violations("model.rs", src).len(), 1);
}

#[test]
fn grouped_imports_are_spelled_out() {
    let src = "use std::{\n    collections::HashMap,\n    fs::{self, File},\n};\n";
    let found = engine_violations("model.rs", src);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].starts_with("model.rs:1: `std::fs`"), "{found:?}");
    let src = "use crate::{engine::Options, server::Config};\n";
    assert_eq!(layer_violations("storage/wal.rs", 1, src).len(), 1);
}

#[test]
fn test_code_is_held_to_the_io_rules_only() {
    let src = concat!(
        "fn f() {}\n",
        "#[cfg(test)]\n",
        "mod tests {\n",
        "    fn t() { std::thread::spawn(|| {}); }\n",
        "}\n",
        "fn g() { std::thread::spawn(|| {}); }\n",
    );
    let found = engine_violations("model.rs", src);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].starts_with("model.rs:6:"), "{found:?}");
    let src = "#[cfg(test)]\nmod tests {\n    fn t() { std::fs::read(\"x\"); }\n}\n";
    assert_eq!(engine_violations("model.rs", src).len(), 1);
    let src = "fn t() { std::thread::spawn(|| {}); }\n";
    assert_eq!(
        engine_violations("ensemble/tests.rs", src),
        Vec::<String>::new()
    );
}

#[test]
fn the_step_pool_may_be_built_only_in_its_own_file() {
    let src = "fn p() { rayon::ThreadPoolBuilder::new().build(); }\n";
    assert_eq!(
        engine_violations("ensemble/parallel.rs", src),
        Vec::<String>::new()
    );
    assert_eq!(engine_violations("ensemble/mod.rs", src).len(), 2);
}

#[test]
fn a_part_may_not_reach_up_through_super() {
    let src = "use super::super::server::Config;\nuse super::wal::Wal;\n";
    // storage/store/tests.rs: three `super::` reach the crate root, two do not.
    assert_eq!(
        layer_violations("storage/store/tests.rs", 1, src),
        Vec::<String>::new()
    );
    let src = "use super::super::super::server::Config;\n";
    assert_eq!(layer_violations("storage/store/tests.rs", 1, src).len(), 1);
    assert_eq!(
        layer_violations("cli/mod.rs", 5, "use crate::server;\n"),
        Vec::<String>::new()
    );
}

#[test]
fn the_cluster_part_sits_between_eval_and_server() {
    assert_eq!(
        layer_violations("cluster/node.rs", 3, "use crate::server::Config;\n").len(),
        1
    );
    assert_eq!(
        layer_violations("server/cluster.rs", 4, "use crate::cluster::Cluster;\n"),
        Vec::<String>::new()
    );
}
