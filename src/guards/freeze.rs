//! Write freeze (SPEC §5): requests matching `writes.routes` ("METHOD /path-prefix") are writes; while
//! writes are frozen they get 503 with `Retry-After`, and reads go on.

use http::Method;

use crate::config::parse_write_route;

/// The write routes of the config, parsed once.
#[derive(Debug, Clone, Default)]
pub struct WriteRoutes(Vec<(Method, String)>);

impl WriteRoutes {
    pub fn new(routes: &[String]) -> Self {
        WriteRoutes(routes.iter().filter_map(|r| parse_write_route(r)).collect())
    }

    /// Whether a request is a write: its method matches and its path starts with the prefix at a
    /// segment boundary (`/ingest` covers `/ingest` and `/ingest/x`, not `/ingestion`).
    pub fn is_write(&self, method: &Method, path: &str) -> bool {
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
}
