//! One way to print an error with its causes, for logs, JSON error bodies and the CLI. A leaf.

/// `e` and each of its sources, joined by ": "; a cause whose text the message already carries (a
/// wrapper that prints its source) is said once.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("connect to {addr}: {detail}")]
    struct Says {
        addr: &'static str,
        #[source]
        detail: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("webhook failed")]
    struct Hides(#[source] std::io::Error);

    #[test]
    fn each_cause_is_said_once() {
        let io = || std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let says = Says {
            addr: "h:1",
            detail: io(),
        };
        assert_eq!(super::chain(&says), "connect to h:1: refused");
        assert_eq!(super::chain(&Hides(io())), "webhook failed: refused");
    }
}
