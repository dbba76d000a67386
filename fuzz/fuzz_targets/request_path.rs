//! Request-path header handling: a request line and header fields from the input run through what the
//! proxy does to every request before it goes upstream — the write-route match (freeze, fence), the
//! request id, X-Forwarded-For, hop-by-hop stripping, cookie joining, the answer format. Never panics,
//! and what it sends on is still a valid header map.
#![no_main]

use driftguard::config::Writes;
use driftguard::guards::freeze::WriteRoutes;
use driftguard::serve::headers;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let first = lines.next().unwrap_or("");
    let (method, path) = first.split_once(' ').unwrap_or(("POST", first));
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return;
    };
    let mut map = HeaderMap::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.trim().as_bytes()),
            HeaderValue::from_bytes(value.trim().as_bytes()),
        ) {
            map.append(n, v);
        }
    }
    for (case_sensitive, match_suffix) in [(false, true), (true, false)] {
        let routes = WriteRoutes::new(&Writes {
            routes: vec!["POST /ingest".into(), "DELETE /docs/".into(), "PUT /".into()],
            case_sensitive,
            match_suffix,
            ..Writes::default()
        });
        let _ = routes.is_write(&method, path);
    }
    let _ = headers::request_id(&map);
    let peer = headers::Peer::new("127.0.0.1:1".parse().unwrap());
    headers::forwarded_for(&mut map, &peer);
    headers::strip_hop_by_hop(&mut map);
    headers::join_cookies(&mut map);
    let _ = headers::answer_format(&map);
    for (name, value) in &map {
        assert!(HeaderValue::from_bytes(value.as_bytes()).is_ok(), "{name}");
    }
});
