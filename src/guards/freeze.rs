//! Write freeze (SPEC §5): requests matching `writes.routes` ("METHOD /path-prefix") are writes; while
//! writes are frozen they get 503 with `Retry-After`, and reads go on. `serve::handle` runs [`admit`];
//! the fence step also asks [`WriteRoutes::is_write`].

use http::Method;

use crate::config::parse_write_route;

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

/// The write routes of the config, parsed once.
#[derive(Debug, Clone, Default)]
pub struct WriteRoutes(Vec<(Method, String)>);

impl WriteRoutes {
    pub fn new(routes: &[String]) -> Self {
        WriteRoutes(routes.iter().filter_map(|r| parse_write_route(r)).collect())
    }

    /// Whether a request is a write: its method matches and its path starts with the prefix at a
    /// segment boundary (`/ingest` covers `/ingest` and `/ingest/x`, not `/ingestion`). The path is
    /// compared in its normal form, so `/%69ngest`, `/./ingest` or `//ingest` are writes too.
    pub fn is_write(&self, method: &Method, path: &str) -> bool {
        if !self.0.iter().any(|(m, _)| m == method) {
            return false;
        }
        let path = normalize(path);
        let path = path.as_ref();
        self.0.iter().any(|(m, prefix)| {
            m == method
                && path.starts_with(prefix.as_str())
                && (prefix.ends_with('/')
                    || matches!(path.as_bytes().get(prefix.len()), None | Some(b'/' | b'?')))
        })
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The path as an upstream would route it: percent-decoded, empty and `.` segments dropped, `..`
/// resolved. Borrowed when there is nothing to do (the common case).
fn normalize(path: &str) -> std::borrow::Cow<'_, str> {
    if !path.contains('%') && !path.contains("//") && !path.contains("/.") {
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
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
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
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_by_method_and_segment_prefix() {
        let w = WriteRoutes::new(&[
            "POST /ingest".into(),
            "DELETE /docs".into(),
            "PUT /a/".into(),
        ]);
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
        let w = WriteRoutes::new(&["POST /ingest".into(), "DELETE /docs".into()]);
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
        assert_eq!(normalize("/a/b/"), "/a/b/");
        assert_eq!(normalize("/../.."), "/");
    }
}
