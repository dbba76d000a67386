//! The `openai` embedder: any OpenAI-compatible `/v1/embeddings` endpoint (text-embeddings-inference,
//! vLLM, Ollama, …) over plain HTTP, batched, with a timeout and an LRU cache keyed by a hash of the text,
//! so a chunk retrieved again and again is embedded once.
//!
//! It is called from the evaluation threads, which block on the small runtime of its `net::Blocking`
//! client — never the proxy's.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Uri};

use crate::net;
use crate::signals::embed::cache::VectorCache;
use crate::signals::embed::{EmbedError, Embedder};

/// Texts sent in one request at most.
const MAX_BATCH: usize = 64;
/// Largest response read from the endpoint.
const MAX_RESPONSE: usize = 64 << 20;

pub struct OpenAi {
    url: Uri,
    model: String,
    timeout: Duration,
    api_key: Option<HeaderValue>,
    /// Pooled, on an I/O thread of its own; dropping it is safe on any thread.
    client: net::Blocking,
    cache: VectorCache,
}

impl OpenAi {
    pub fn new(
        url: &str,
        model: &str,
        timeout: Duration,
        api_key: Option<String>,
        cache_entries: usize,
        trust: &crate::config::Trust,
    ) -> Result<Self, EmbedError> {
        let url = net::url(url).map_err(|e| EmbedError::Endpoint(format!("embeddings url {e}")))?;
        let roots = net::Roots::load(trust).map_err(|e| EmbedError::Endpoint(e.to_string()))?;
        let client = net::Client::builder(timeout)
            .roots(roots)
            .connect_timeout(timeout)
            .nodelay()
            .max_response(MAX_RESPONSE)
            .build();
        let client = net::Blocking::with_io_thread(client, "driftguard-embed-io").map_err(|e| {
            EmbedError::Endpoint(format!("cannot start the embedder's runtime: {e}"))
        })?;
        let api_key = api_key
            .map(|k| HeaderValue::try_from(format!("Bearer {k}")))
            .transpose()
            .map_err(|_| EmbedError::Endpoint("the API key is not a valid header value".into()))?;
        Ok(OpenAi {
            url,
            model: model.to_string(),
            timeout,
            api_key,
            client,
            cache: VectorCache::new(cache_entries),
        })
    }

    fn request(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let body = serde_json::json!({"model": self.model, "input": texts}).to_string();
        let mut req = Request::post(self.url.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .body(Bytes::from(body))
            .map_err(|e| EmbedError::Endpoint(e.to_string()))?;
        if let Some(key) = &self.api_key {
            req.headers_mut().insert(header::AUTHORIZATION, key.clone());
        }
        let resp = self.client.send(req).map_err(|e| match e {
            net::Error::Timeout { .. } => EmbedError::Timeout(self.timeout),
            net::Error::Connect { cause, .. } => {
                EmbedError::Endpoint(format!("{}: {cause}", self.url))
            }
            net::Error::Read { cause, .. } => {
                EmbedError::Endpoint(format!("reading the response: {cause}"))
            }
            other => EmbedError::Endpoint(other.to_string()),
        })?;
        let status = resp.status();
        let bytes = resp.into_body();
        if !status.is_success() {
            let text = String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned();
            return Err(EmbedError::Endpoint(format!(
                "{} answered {status}: {text}",
                self.url
            )));
        }
        parse_response(&bytes, texts.len())
    }
}

/// Reads `{"data":[{"index":i,"embedding":[...]}, ...]}` into vectors in input order.
fn parse_response(bytes: &[u8], expected: usize) -> Result<Vec<Vec<f32>>, EmbedError> {
    #[derive(serde::Deserialize)]
    struct Item {
        #[serde(default)]
        index: Option<usize>,
        embedding: Vec<f32>,
    }
    #[derive(serde::Deserialize)]
    struct Response {
        data: Vec<Item>,
    }
    let parsed: Response =
        serde_json::from_slice(bytes).map_err(|e| EmbedError::Malformed(e.to_string()))?;
    if parsed.data.len() != expected {
        return Err(EmbedError::Count {
            expected,
            got: parsed.data.len(),
        });
    }
    let mut out = vec![Vec::new(); expected];
    for (i, item) in parsed.data.into_iter().enumerate() {
        let at = item.index.unwrap_or(i);
        let slot = out
            .get_mut(at)
            .ok_or_else(|| EmbedError::Malformed(format!("embedding index {at} out of range")))?;
        *slot = item.embedding;
    }
    if out.iter().any(Vec::is_empty) {
        return Err(EmbedError::Malformed(
            "an embedding is missing or empty".into(),
        ));
    }
    Ok(out)
}

impl Embedder for OpenAi {
    fn name(&self) -> &'static str {
        "openai"
    }

    fn embed_batch(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        self.cache
            .embed_through(texts, MAX_BATCH, |batch| self.request(batch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_in_index_order() {
        let body = br#"{"object":"list","data":[{"index":1,"embedding":[0.0,1.0]},{"index":0,"embedding":[1.0,0.0]}]}"#;
        let v = parse_response(body, 2).unwrap();
        assert_eq!(v, vec![vec![1.0, 0.0], vec![0.0, 1.0]]);
        assert!(parse_response(body, 3).is_err());
        assert!(parse_response(b"{}", 1).is_err());
    }
}
