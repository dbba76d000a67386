//! The house rules of STYLE.md ("folders are stages, arrows point down"), held by a test.
//!
//! Every file under `src/` is lexed (comments, strings and char literals dropped) and each path that starts
//! at the crate root is an arrow from the file's top-level module to the module it names: `crate::x`
//! (brace groups expanded), a `super::` chain that climbs out of the file's top-level module, and
//! `driftguard::x` in `main.rs`. [`LAYERS`] says which arrows may exist, so a wrong one fails CI with the
//! file and the line instead of waiting for a review. A second test forbids import circles whatever the
//! table says; a third keeps the routing-table swap inside `rollback::control`. The lexer has its own tests
//! at the bottom, so a bug in it cannot quietly make the real checks vacuous. Macros are not expanded: a
//! path a macro pastes together from pieces is not seen.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::Path;

/// For each top-level module, the top-level modules it may use (a module may always use itself). `lib`
/// stands for an item at the crate root that is no module: lib.rs holds only `pub mod` lines and docs.
#[rustfmt::skip]
const LAYERS: &[(&str, &[&str])] = &[
    ("shutdown",  &[]),
    ("clock",     &[]),
    ("error",     &[]),
    ("capture",   &[]),
    ("config",    &["shutdown", "clock", "error", "capture"]),
    ("signals",   &["net", "config", "shutdown", "clock", "error", "capture"]),
    ("windows",   &["config", "shutdown", "clock", "error", "capture"]),
    ("rules",     &["windows", "config", "shutdown", "clock", "error", "capture"]),
    ("telemetry", &["windows", "net", "config", "shutdown", "clock", "error", "capture"]),
    ("net",       &["config", "shutdown", "clock", "error", "capture"]),
    ("guards",    &["config", "signals", "telemetry", "windows", "net", "shutdown", "clock", "error", "capture"]),
    ("eval",      &["signals", "windows", "telemetry", "config", "shutdown", "clock", "error", "capture"]),
    ("serve",     &["guards", "eval", "signals", "windows", "telemetry", "net", "config", "shutdown", "clock", "error", "capture"]),
    ("rollback",  &["fleet", "rules", "windows", "serve", "guards", "telemetry", "net", "config", "shutdown", "clock", "error", "capture"]),
    ("fleet",     &["rules", "windows", "config", "telemetry", "net", "shutdown", "clock", "error", "capture"]),
    ("app",       &["rollback", "fleet", "serve", "guards", "eval", "signals", "windows", "rules", "telemetry",
                    "net", "config", "shutdown", "clock", "error", "capture"]),
    ("admin",     &["app", "rollback", "fleet", "serve", "guards", "eval", "signals", "windows", "rules",
                    "telemetry", "net", "config", "shutdown", "clock", "error", "capture"]),
    ("cmd",       &["lib", "admin", "app", "rollback", "fleet", "serve", "guards", "eval", "signals", "windows",
                    "rules", "telemetry", "net", "config", "shutdown", "clock", "error", "capture"]),
    ("main",      &["lib", "cmd", "config", "shutdown", "clock", "error", "capture"]),
    ("lib",       &[]),
];

/// The one file (with its `control/` tests) that may swap the routing table.
const TABLE_WRITER: &str = "rollback/control";

#[test]
fn arrows_point_down() {
    let files = crate_files();
    let (mut wrong, mut unlisted) = (Vec::new(), BTreeSet::new());
    for (rel, _) in &files {
        if allowed(&top_of(rel)).is_none() && unlisted.insert(top_of(rel)) {
            wrong.push(format!("src/{rel}:1: {} has no row in LAYERS", top_of(rel)));
        }
    }
    for (rel, line, from, to) in arrows(&files) {
        if allowed(&from).is_some_and(|ok| !ok.contains(&to.as_str())) {
            wrong.push(format!(
                "src/{rel}:{line}: {from} -> {to} breaks \"{}\"",
                rule_text(&from)
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} arrow(s) point the wrong way (STYLE.md; LAYERS):\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

#[test]
fn no_import_circle_between_top_level_modules() {
    let edges = edges(&crate_files());
    if let Some(cycle) = shortest_cycle(&edges) {
        let mut message = format!("import circle {}:", cycle.join(" -> "));
        for w in cycle.windows(2) {
            let at = &edges[&(w[0].clone(), w[1].clone())];
            message += &format!("\n  {} -> {} at {at}", w[0], w[1]);
        }
        panic!("{message}");
    }
}

#[test]
fn only_rollback_control_swaps_the_routing_table() {
    let writer = |rel: &str| {
        rel == format!("{TABLE_WRITER}.rs") || rel.starts_with(&format!("{TABLE_WRITER}/"))
    };
    let mut swaps = Vec::new();
    for (rel, text) in crate_files().iter().filter(|(rel, _)| !writer(rel)) {
        for line in table_swaps(text) {
            swaps.push(format!("src/{rel}:{line}: swaps the routing table"));
        }
    }
    assert!(
        swaps.is_empty(),
        "only src/{TABLE_WRITER}.rs may swap the routing table:\n{}",
        swaps.join("\n")
    );
}

#[test]
fn the_walker_sees_the_crate() {
    let files = crate_files();
    assert!(files.len() > 30, "only {} files under src/", files.len());
    let edges = edges(&files);
    let seen = edges.contains_key(&("serve".into(), "config".into()));
    assert!(seen, "serve -> config not seen; arrows: {:?}", edges.keys());
}

// === the walker and the graph ===

/// Every `src/**/*.rs` as (path under src/ with `/` separators, text), sorted.
fn crate_files() -> Vec<(String, String)> {
    fn walk(dir: &Path, rel: &str, out: &mut Vec<(String, String)>) {
        for entry in std::fs::read_dir(dir).expect("read src/") {
            let path = entry.expect("read src/").path();
            let name = format!("{rel}{}", path.file_name().unwrap().to_string_lossy());
            if path.is_dir() {
                walk(&path, &format!("{name}/"), out);
            } else if name.ends_with(".rs") {
                let text = std::fs::read_to_string(&path).expect("read a source file");
                out.push((name, text));
            }
        }
    }
    let (src, mut files) = (
        Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        Vec::new(),
    );
    walk(&src, "", &mut files);
    files.sort();
    files
}

/// `serve/router.rs` → `serve`, `app.rs` → `app`, `lib.rs` → `lib`, `main.rs` → `main`.
fn top_of(rel: &str) -> String {
    let first = rel.split('/').next().unwrap_or(rel);
    first.strip_suffix(".rs").unwrap_or(first).to_string()
}

fn allowed(from: &str) -> Option<&'static [&'static str]> {
    LAYERS.iter().find(|(m, _)| *m == from).map(|(_, to)| *to)
}

fn rule_text(from: &str) -> String {
    match allowed(from) {
        Some([]) => format!("{from} uses nothing of the crate"),
        Some(to) => format!("{from} may use only {}", to.join(", ")),
        None => format!("{from} has no row in LAYERS"),
    }
}

/// Every use of another top-level module: (file, line, from, to). A root name that is no module is `lib`.
fn arrows(files: &[(String, String)]) -> Vec<(String, usize, String, String)> {
    let modules: BTreeSet<String> = files.iter().map(|(rel, _)| top_of(rel)).collect();
    let mut arrows = Vec::new();
    for (rel, text) in files {
        for (line, to) in uses(rel, text) {
            let to = if modules.contains(&to) {
                to
            } else {
                "lib".into()
            };
            if to != top_of(rel) {
                arrows.push((rel.clone(), line, top_of(rel), to));
            }
        }
    }
    arrows
}

/// The graph of actual arrows: (from, to) → the first `src/file:line` that draws it.
fn edges(files: &[(String, String)]) -> BTreeMap<(String, String), String> {
    let mut edges = BTreeMap::new();
    for (rel, line, from, to) in arrows(files) {
        edges
            .entry((from, to))
            .or_insert(format!("src/{rel}:{line}"));
    }
    edges
}

/// The shortest circle in the graph (breadth-first from every node), as `[a, b, .., a]`.
fn shortest_cycle(edges: &BTreeMap<(String, String), String>) -> Option<Vec<String>> {
    let mut best: Option<Vec<String>> = None;
    for start in edges.keys().map(|(from, _)| from) {
        let (mut came_from, mut queue) = (BTreeMap::new(), VecDeque::from([start]));
        'search: while let Some(at) = queue.pop_front() {
            for (_, next) in edges.keys().filter(|(from, _)| from == at) {
                if next == start {
                    let mut cycle = vec![start.clone()];
                    let mut hop = at;
                    while hop != start {
                        cycle.push(hop.clone());
                        hop = came_from[hop];
                    }
                    cycle.push(start.clone());
                    cycle.reverse();
                    if best.as_ref().is_none_or(|b| cycle.len() < b.len()) {
                        best = Some(cycle);
                    }
                    break 'search;
                }
                if !came_from.contains_key(next) {
                    came_from.insert(next, at);
                    queue.push_back(next);
                }
            }
        }
    }
    best
}

// === the lexer ===

/// Identifiers, `::` and single punctuation characters with their lines; comments (doc comments too),
/// string, byte-string, raw-string and char literals are dropped. Lifetimes leave a harmless `'`.
fn lex(src: &str) -> Vec<(String, usize)> {
    let c: Vec<char> = src.chars().collect();
    let at = |i: usize| c.get(i).copied().unwrap_or('\0');
    let word_char = |ch: char| ch.is_alphanumeric() || ch == '_';
    let (mut toks, mut line, mut i) = (Vec::new(), 1, 0);
    while i < c.len() {
        let start = i;
        if at(i) == '/' && at(i + 1) == '/' {
            i = (i..c.len()).find(|&j| c[j] == '\n').unwrap_or(c.len());
        } else if at(i) == '/' && at(i + 1) == '*' {
            let mut depth = 0; // block comments nest
            while i < c.len() {
                let (open, close) = (
                    (at(i), at(i + 1)) == ('/', '*'),
                    (at(i), at(i + 1)) == ('*', '/'),
                );
                depth += open as i32 - close as i32;
                i += if open || close { 2 } else { 1 };
                if depth == 0 {
                    break;
                }
            }
        } else if at(i) == '"' {
            i += 1;
            while i < c.len() && at(i) != '"' {
                i += if at(i) == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if at(i) == '\'' && at(i + 1) == '\\' {
            i = (i + 3..c.len())
                .find(|&j| c[j] == '\'')
                .map_or(c.len(), |j| j + 1);
        } else if at(i) == '\'' && at(i + 2) == '\'' {
            i += 3;
        } else if word_char(at(i)) {
            while word_char(at(i)) {
                i += 1;
            }
            let word: String = c[start..i].iter().collect();
            let hashes = (i..).take_while(|&j| at(j) == '#').count();
            if matches!(word.as_str(), "r" | "br") && at(i + hashes) == '"' {
                i += hashes + 1; // a raw string runs to a quote followed by as many hashes
                while i < c.len() && !(at(i) == '"' && (1..=hashes).all(|n| at(i + n) == '#')) {
                    i += 1;
                }
                i += 1 + hashes;
            } else {
                toks.push((word, line));
            }
        } else if at(i) == ':' && at(i + 1) == ':' {
            toks.push(("::".to_string(), line));
            i += 2;
        } else {
            if !at(i).is_whitespace() {
                toks.push((at(i).to_string(), line));
            }
            i += 1;
        }
        i = i.min(c.len());
        line += c[start..i].iter().filter(|&&ch| ch == '\n').count();
    }
    toks
}

/// Every path in file `rel` (under src/) that leaves the file's top-level module: (line, the top-level
/// name it reaches). `super::` resolves against the file's module path, inline `mod x { .. }` included.
fn uses(rel: &str, text: &str) -> Vec<(usize, String)> {
    let t = lex(text);
    let tok = |k: usize| t.get(k).map_or("", |(s, _)| s.as_str());
    let stem = rel.trim_end_matches(".rs").trim_end_matches("/mod");
    let mut module: Vec<String> = match stem {
        "lib" | "main" => Vec::new(),
        _ => stem.split('/').map(String::from).collect(),
    };
    let (mut depth, mut inline) = (0, Vec::new()); // brace depth at each open inline `mod x {`
    let mut found = Vec::new();
    for i in 0..t.len() {
        match tok(i) {
            "mod" if tok(i + 2) == "{" => {
                module.push(tok(i + 1).to_string());
                inline.push(depth);
            }
            "{" => depth += 1,
            "}" => {
                depth -= 1;
                if inline.last() == Some(&depth) {
                    inline.pop();
                    module.pop();
                }
            }
            _ => {}
        }
        // main.rs reaches the library by its name; `super`/`self` after `::` continue a chain already read
        let root = match tok(i) {
            "driftguard" => rel == "main.rs",
            "crate" => rel != "main.rs",
            "super" | "self" => rel != "main.rs" && (i == 0 || tok(i - 1) != "::"),
            _ => false,
        };
        if !root || tok(i + 1) != "::" {
            continue;
        }
        let from_root = matches!(tok(i), "crate" | "driftguard");
        let (mut keep, mut k) = if from_root {
            (Some(0), i + 2)
        } else {
            (Some(module.len()), i)
        };
        while matches!(tok(k), "super" | "self") && tok(k + 1) == "::" {
            if tok(k) == "super" {
                keep = keep.and_then(|n| n.checked_sub(1));
            }
            k += 2;
        }
        // short of the root, a chain stays in the file's own top-level module; above it, rustc rejects it
        if keep == Some(0) {
            heads(&t, k, &mut found, true);
        }
    }
    found.retain(|(_, to)| *to != top_of(rel));
    found
}

/// Reads the use tree at `t[k]` (`a::b`, `{a::b, c}`, `*`, `a as b`), recording its first segment(s) when
/// `record`; returns the index after it.
fn heads(
    t: &[(String, usize)],
    mut k: usize,
    found: &mut Vec<(usize, String)>,
    record: bool,
) -> usize {
    let tok = |k: usize| t.get(k).map_or("", |(s, _)| s.as_str());
    if tok(k) == "{" {
        k += 1;
        while !matches!(tok(k), "}" | "") {
            k = heads(t, k, found, record);
            match tok(k) {
                "," => k += 1,
                "}" => {}
                _ => return k, // not a use tree (a macro, a turbofish): stop reading
            }
        }
        return k + 1;
    }
    if let Some((head, line)) = t.get(k).filter(|_| record) {
        found.push((*line, head.clone()));
    }
    k += 1;
    if tok(k) == "::" {
        k = heads(t, k + 1, found, false);
    }
    if tok(k) == "as" {
        k += 2;
    }
    k
}

/// Lines that call `.store(` or `.swap(` on something whose name ends in `table`.
fn table_swaps(text: &str) -> Vec<usize> {
    let t = lex(text);
    let swap = |w: &[(String, usize)]| w[0].0.ends_with("table") && w[1].0 == "." && w[3].0 == "(";
    let swaps = t
        .windows(4)
        .filter(|w| swap(w) && matches!(w[2].0.as_str(), "store" | "swap"));
    swaps.map(|w| w[2].1).collect()
}

// === the lexer's own tests ===

/// (file under src/, text, the top-level names `uses` must find there, in order)
#[rustfmt::skip]
const CASES: &[(&str, &str, &[&str])] = &[
    ("serve/mod.rs", "use crate::{app, shutdown};", &["app", "shutdown"]),
    ("serve/mod.rs", "use crate::{a::{b, c}, d};", &["a", "d"]),
    ("serve/mod.rs", "use crate::{\n  a::{b::{c, d}, e as f},\n  g::*,\n  h as i,\n};", &["a", "g", "h"]),
    ("serve/mod.rs", "use crate::{{x, y}, z};", &["x", "y", "z"]),
    ("serve/mod.rs", "use crate::{serve::pins, config};", &["config"]),
    ("serve/mod.rs", "let m = crate::telemetry::Metrics::new(); pub(crate) fn g() {}", &["telemetry"]),
    // super chains resolve against the file's module path; a chain that stays home is no arrow
    ("serve/router.rs", "use super::pins; use super::super::config::Config;", &["config"]),
    ("serve/mod.rs", "use super::rules; use self::pins::Pin;", &["rules"]),
    ("app.rs", "use super::{config, net::Client};", &["config", "net"]),
    ("serve/body/tee.rs", "fn f() { super::super::super::eval::push(); }", &["eval"]),
    ("config.rs", "use super::super::x;", &[]),
    // an inline module is one level deeper: `mod tests { use super::*; }` stays home
    ("app.rs", "#[cfg(test)]\nmod tests {\n    use super::*;\n}\nuse super::rules;", &["rules"]),
    ("guards/spend.rs", "mod tests { fn t() { super::super::budget::x(); super::super::super::rules::y(); } }", &["rules"]),
    ("windows/mod.rs", "mod a { mod b { use super::super::super::app; } }", &["app"]),
    // main.rs reaches the library by its name, its own `crate::` is the binary; lib.rs has no parent
    ("main.rs", "use driftguard::{cmd, config::Config};\nmod x { use crate::y; use super::z; }", &["cmd", "config"]),
    ("main.rs", "fn main() { driftguard::cmd::run(); ::driftguard::error::E; }", &["cmd", "error"]),
    ("lib.rs", "pub mod a;\npub use crate::b::B;\npub use self::c::C;", &["b", "c"]),
];

#[test]
fn lexer_finds_the_arrows_of_every_case() {
    for (rel, text, want) in CASES {
        let got: Vec<String> = uses(rel, text).into_iter().map(|(_, to)| to).collect();
        assert_eq!(got, *want, "in {rel}: {text}");
    }
}

#[test]
fn lexer_skips_comments_and_literals_and_keeps_lines() {
    let text = r###"// use crate::app;
/// Calls [`crate::admin::x`].
//! crate::cmd
/* crate::app /* nested crate::app */ crate::app */
let s = "crate::app \" crate::app";
let r = r#"crate::app " crate::app"#;
let b = br"crate::app";
let q = '"'; let e = '\''; let l: &'static str = "x";
use crate::{config, // crate::app
    windows};
"###;
    let want = [(9, "config".to_string()), (10, "windows".to_string())];
    assert_eq!(uses("serve/ring.rs", text), want);
}

#[test]
fn table_swaps_are_found_across_lines_not_in_comments() {
    let text = "// self.table.store(t)\nself.table.store(Arc::new(t));\nlet x = \"table.swap(\";\n\
                self.routing_table\n    .swap(t);\nself.table.load();";
    assert_eq!(table_swaps(text), [2, 5]);
}
