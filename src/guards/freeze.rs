//! Write freeze (SPEC §5): requests matching `writes.routes` ("METHOD /path-prefix") are writes; while
//! writes are frozen they get 503 with `Retry-After`, and reads go on. `serve::handle` runs [`admit`];
//! the fence step also asks [`WriteRoutes::is_write`].

use http::Method;

use crate::config::{parse_write_route, Writes};

/// A write refused because writes are frozen (SPEC §5: 503 `writes_frozen`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WritesFrozen;

/// The freeze step: while `frozen`, a write is refused; reads (and everything while not frozen) pass.
#[inline]
pub fn admit(
    frozen: bool,
    routes: &WriteRoutes,
    method: &Method,
    path: &str,
) -> Result<(), WritesFrozen> {
    if frozen && routes.is_write(method, path) {
        Err(WritesFrozen)
    } else {
        Ok(())
    }
}

/// The write routes of the config, parsed once, with how they match (`writes.case_sensitive`,
/// `writes.match_suffix`).
#[derive(Debug, Clone, Default)]
pub struct WriteRoutes {
    routes: Vec<(Method, String)>,
    case_sensitive: bool,
    match_suffix: bool,
}

impl WriteRoutes {
    pub fn new(writes: &Writes) -> Self {
        let fold = !writes.case_sensitive;
        WriteRoutes {
            routes: writes
                .routes
                .iter()
                .filter_map(|r| parse_write_route(r))
                .map(|(m, prefix)| (m, normalize(&prefix, fold).into_owned()))
                .collect(),
            case_sensitive: writes.case_sensitive,
            match_suffix: writes.match_suffix,
        }
    }

    /// Whether a request is a write: its method matches and its path starts with the prefix at a
    /// segment boundary (`/ingest` covers `/ingest` and `/ingest/x`, not `/ingestion`). The path is
    /// compared as an upstream may route it (see [`normalize`]): `/%69ngest`, `/./ingest`, `//ingest`,
    /// `/ingest;jsessionid=1`, `/ingest%20`, `/ingest%00` are writes, and so are `/INGEST` unless
    /// `case_sensitive`, and `/ingest.json` while `match_suffix`.
    pub fn is_write(&self, method: &Method, path: &str) -> bool {
        if !self.routes.iter().any(|(m, _)| m == method) {
            return false;
        }
        let path = normalize(path, !self.case_sensitive);
        let path = path.as_ref();
        self.routes.iter().any(|(m, prefix)| {
            m == method
                && path.starts_with(prefix.as_str())
                && (prefix.ends_with('/')
                    || match path.as_bytes().get(prefix.len()) {
                        None | Some(b'/') => true,
                        Some(b'.') => self.match_suffix,
                        Some(_) => false,
                    })
        })
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

/// The path as an upstream may route it: the query cut off, percent-decoded, each segment cut at its
/// first `;` (matrix parameters such as `;jsessionid=1`, which servlet containers strip) and at a NUL,
/// trailing whitespace, control characters and dots trimmed (servers that trim them, C code that stops
/// at NUL), empty and `.` segments dropped, `..` resolved, and lowercased when `fold_case`. Borrowed
/// when there is nothing to do (the common case).
fn normalize(path: &str, fold_case: bool) -> std::borrow::Cow<'_, str> {
    let path = path.split(['?', '#']).next().unwrap_or("");
    let plain = |b: &u8| {
        b.is_ascii_lowercase()
            || b.is_ascii_digit()
            || matches!(b, b'/' | b'-' | b'_')
            || (!fold_case && b.is_ascii_uppercase())
    };
    if path.starts_with('/') && path.as_bytes().iter().all(plain) && !path.contains("//") {
        return std::borrow::Cow::Borrowed(path);
    }
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).and_then(|b| hex(*b)),
            bytes.get(i + 2).and_then(|b| hex(*b)),
        ) {
            (b'%', Some(hi), Some(lo)) => {
                decoded.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b, _, _) => {
                decoded.push(b);
                i += 1;
            }
        }
    }
    let decoded = String::from_utf8_lossy(&decoded);
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        let segment = segment.split([';', '\0']).next().unwrap_or("");
        let segment = segment.trim_end_matches(|c: char| c.is_whitespace() || c.is_control());
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => {
                let s = s.trim_end_matches('.');
                if !s.is_empty() {
                    segments.push(s);
                }
            }
        }
    }
    let trailing = decoded.ends_with('/') && !segments.is_empty();
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || trailing {
        out.push('/');
    }
    if fold_case {
        out = out.to_lowercase();
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_by_method_and_segment_prefix() {
        let w = routes(&["POST /ingest", "DELETE /docs", "PUT /a/"]);
        assert!(w.is_write(&Method::POST, "/ingest"));
        assert!(w.is_write(&Method::POST, "/ingest/batch"));
        assert!(!w.is_write(&Method::POST, "/ingestion"));
        assert!(!w.is_write(&Method::GET, "/ingest"));
        assert!(w.is_write(&Method::DELETE, "/docs/42"));
        assert!(w.is_write(&Method::PUT, "/a/b"));
        assert!(!w.is_write(&Method::POST, "/ask"));
    }

    #[test]
    fn other_spellings_of_a_write_path_are_writes() {
        let w = routes(&["POST /ingest", "DELETE /docs"]);
        for path in [
            "/%69ngest",
            "/./ingest",
            "/x/../ingest",
            "//ingest",
            "/ingest%2Fbatch",
            "/%2e/ingest",
        ] {
            assert!(w.is_write(&Method::POST, path), "{path}");
        }
        assert!(w.is_write(&Method::DELETE, "/%64ocs/1"));
        assert!(!w.is_write(&Method::POST, "/%69ngestion"));
        assert_eq!(normalize("/a/b/", true), "/a/b/");
        assert_eq!(normalize("/../..", true), "/");
    }

    fn routes(routes: &[&str]) -> WriteRoutes {
        WriteRoutes::new(&Writes {
            routes: routes.iter().map(|r| r.to_string()).collect(),
            ..Writes::default()
        })
    }

    #[test]
    fn parameters_case_suffixes_and_trailing_junk_are_writes_by_default() {
        let w = routes(&["POST /ingest"]);
        for path in [
            "/INGEST",
            "/Ingest/batch",
            "/ingest;jsessionid=1",
            "/ingest;a=b/batch",
            "/ingest.json",
            "/ingest%20",
            "/ingest%00",
            "/ingest%00.html",
            "/ingest%09",
            "/ingest.",
            "/ingest?x=1",
        ] {
            assert!(w.is_write(&Method::POST, path), "{path}");
        }
        for path in ["/ingestion", "/ingest-v2", "/in%20gest", "/ingest_x"] {
            assert!(!w.is_write(&Method::POST, path), "{path}");
        }
    }

    #[test]
    fn case_and_suffix_matching_can_be_turned_off() {
        let w = WriteRoutes::new(&Writes {
            routes: vec!["POST /Ingest".into()],
            case_sensitive: true,
            match_suffix: false,
            ..Writes::default()
        });
        assert!(w.is_write(&Method::POST, "/Ingest"));
        assert!(w.is_write(&Method::POST, "/Ingest;x=1"));
        assert!(!w.is_write(&Method::POST, "/ingest"));
        assert!(!w.is_write(&Method::POST, "/INGEST"));
        assert!(!w.is_write(&Method::POST, "/Ingest.json"));
    }
}
