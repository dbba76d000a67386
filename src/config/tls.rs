//! `[tls]`: what every outgoing TLS connection trusts (webhooks, the openai embedder, OTLP, `rediss://`,
//! https arms). The platform's root certificates always; `ca_file` adds a PEM bundle for a private CA.
//! There is no key that turns verification off.
//!
//! A target with a CA of its own (`signals.openai.ca_file`, a hook's `ca_file`) trusts it on top of
//! `[tls] ca_file`. [`Trust`] is that resolved list, filled in by `Config::parse` on every section that
//! makes connections, so their builders (`net::tls`) need nothing but their own section.

use serde::Deserialize;

use super::{err, ConfigError};

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tls {
    /// PEM bundle of CA certificates trusted on top of the platform's roots; empty for none.
    pub ca_file: String,
}

/// The PEM bundles a target trusts on top of the platform's roots, in order: `[tls] ca_file`, then the
/// target's own `ca_file`. Empty: the platform's roots only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trust {
    pub ca_files: Vec<String>,
}

impl Trust {
    /// `[tls] ca_file` plus a target's own (either may be empty).
    pub fn resolve(global: &str, own: &str) -> Trust {
        Trust {
            ca_files: [global, own]
                .into_iter()
                .filter(|f| !f.is_empty())
                .map(String::from)
                .collect(),
        }
    }
}

impl Tls {
    pub(super) fn validate(&self, errors: &mut Vec<ConfigError>) {
        check_ca_file("tls.ca_file", &self.ca_file, errors);
    }
}

/// A `ca_file` must be readable and hold at least one PEM certificate, so a typo fails `check` rather
/// than the first handshake.
pub(super) fn check_ca_file(key: &str, path: &str, errors: &mut Vec<ConfigError>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    if path.is_empty() {
        return;
    }
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(e) => return errors.push(err(key, format!("cannot read {path:?}: {e}"))),
    };
    match CertificateDer::pem_slice_iter(&text).collect::<Result<Vec<_>, _>>() {
        Ok(certs) if certs.is_empty() => errors.push(err(
            key,
            format!("{path:?} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"),
        )),
        Ok(_) => {}
        Err(e) => errors.push(err(key, format!("{path:?} is not a PEM bundle: {e}"))),
    }
}
