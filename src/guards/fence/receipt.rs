//! What the fence stores: a keyed write's [`Fingerprint`] (method, path, body hash) and the [`Receipt`]
//! of its response, with the byte encoding both stores keep. Built by the fence step and `super::Recording`.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What a keyed write is: its method, path (with query) and body hash. Same key, same fingerprint →
/// replay; same key, another fingerprint → conflict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub method: String,
    pub path: String,
    /// Hex sha256 of the request body.
    pub body_sha256: String,
}

impl Fingerprint {
    /// The fields that differ, as `{"field": {"stored": .., "received": ..}}`; hashes shortened to 12
    /// hex digits.
    pub fn diff(&self, received: &Fingerprint) -> serde_json::Map<String, serde_json::Value> {
        let mut diff = serde_json::Map::new();
        let mut field = |name: &str, stored: &str, got: &str| {
            if stored != got {
                diff.insert(
                    name.into(),
                    serde_json::json!({"stored": stored, "received": got}),
                );
            }
        };
        field("method", &self.method, &received.method);
        field("path", &self.path, &received.path);
        let short = |h: &str| h.get(..12).unwrap_or(h).to_string();
        field(
            "body_sha256",
            &short(&self.body_sha256),
            &short(&received.body_sha256),
        );
        diff
    }
}

/// Incremental sha256 of a request body.
#[derive(Default)]
pub struct BodyHash(Sha256);

impl BodyHash {
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    pub fn finish(self) -> String {
        hex::encode(self.0.finalize())
    }
}

/// A stored result of a keyed write.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Receipt {
    pub request: Fingerprint,
    pub status: u16,
    /// Response headers as the first client got them, minus the per-exchange ones.
    pub headers: Vec<(String, String)>,
    /// The body was longer than `writes.receipt_body_max`, or broke off: only status and headers replay.
    pub body_omitted: bool,
    /// Milliseconds since the Unix epoch.
    pub created_ms: u64,
    pub expires_ms: u64,
    #[serde(skip)]
    pub body: Bytes,
}

impl Receipt {
    /// `[expires_ms: u64 BE][meta length: u32 BE][meta JSON][body]`: the expiry first so a purge need
    /// not parse, the body raw so it costs no encoding.
    pub fn encode(&self) -> Vec<u8> {
        let meta = serde_json::to_vec(self).unwrap_or_default();
        let mut out = Vec::with_capacity(12 + meta.len() + self.body.len());
        out.extend_from_slice(&self.expires_ms.to_be_bytes());
        out.extend_from_slice(&(meta.len() as u32).to_be_bytes());
        out.extend_from_slice(&meta);
        out.extend_from_slice(&self.body);
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Receipt> {
        let len = u32::from_be_bytes(bytes.get(8..12)?.try_into().ok()?) as usize;
        let meta = bytes.get(12..12 + len)?;
        let mut receipt: Receipt = serde_json::from_slice(meta).ok()?;
        receipt.body = Bytes::copy_from_slice(bytes.get(12 + len..)?);
        Some(receipt)
    }

    pub(super) fn expires_of(bytes: &[u8]) -> Option<u64> {
        Some(u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?))
    }

    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::OK)
    }

    /// The stored headers, back as a header map.
    pub fn header_map(&self) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(self.headers.len() + 3);
        for (name, value) in &self.headers {
            if let (Ok(n), Ok(v)) = (
                HeaderName::try_from(name.as_str()),
                HeaderValue::try_from(value.as_str()),
            ) {
                map.append(n, v);
            }
        }
        map
    }
}
