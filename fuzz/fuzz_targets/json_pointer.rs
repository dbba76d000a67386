//! JSON-pointer extraction: the first line is a pointer (RFC 6901 with `*`), the rest a JSON document.
//! Parsing never panics, agrees with the config's syntax check, and matching never panics.
#![no_main]

use driftguard::config::pointer_problem;
use driftguard::signals::extract::Pointer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (pointer, doc) = text.split_once('\n').unwrap_or((&text, "{}"));
    let parsed = Pointer::parse(pointer);
    assert_eq!(parsed.is_ok(), pointer_problem(pointer).is_none(), "{pointer:?}");
    if let (Ok(p), Ok(doc)) = (parsed, serde_json::from_str::<serde_json::Value>(doc)) {
        let _ = p.matches(&doc);
    }
});
