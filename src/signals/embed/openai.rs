//! The `openai` embedder: any OpenAI-compatible `/v1/embeddings` endpoint (text-embeddings-inference,
//! vLLM, Ollama, …) over plain HTTP, batched, with a timeout and an LRU cache keyed by a hash of the text,
//! so a chunk retrieved again and again is embedded once.
//!
//! It is called from the evaluation threads, which block on a small runtime of its own — never the
//! proxy's.

use std::time::Duration;

use crate::signals::embed::cache::VectorCache;
use crate::signals::embed::{EmbedError, Embedder};
use bytes::Bytes;
use http::{header, HeaderValue, Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Texts sent in one request at most.
const MAX_BATCH: usize = 64;
/// Largest response read from the endpoint.
const MAX_RESPONSE: usize = 64 << 20;

pub struct OpenAi {
    url: Uri,
    model: String,
    timeout: Duration,
    api_key: Option<HeaderValue>,
    client: Client<HttpConnector, Full<Bytes>>,
    /// Always `Some` until drop; see `Drop`.
    runtime: Option<tokio::runtime::Runtime>,
    cache: VectorCache,
}

impl OpenAi {
    pub fn new(
        url: &str,
        model: &str,
        timeout: Duration,
        api_key: Option<String>,
        cache_entries: usize,
    ) -> Result<Self, EmbedError> {
        let url: Uri = url
            .parse()
            .map_err(|e| EmbedError::Endpoint(format!("embeddings url {url:?}: {e}")))?;
        if url.scheme_str() != Some("http") {
            return Err(EmbedError::Endpoint(format!(
                "embeddings url {url}: only http:// is supported"
            )));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("driftguard-embed-io")
            .enable_all()
            .build()
            .map_err(|e| {
                EmbedError::Endpoint(format!("cannot start the embedder's runtime: {e}"))
            })?;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).build(connector);
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
            runtime: Some(runtime),
            cache: VectorCache::new(cache_entries),
        })
    }

    fn request(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let body = serde_json::json!({"model": self.model, "input": texts}).to_string();
        let mut req = Request::post(self.url.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| EmbedError::Endpoint(e.to_string()))?;
        if let Some(key) = &self.api_key {
            req.headers_mut().insert(header::AUTHORIZATION, key.clone());
        }
        let call = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| EmbedError::Endpoint(format!("{}: {e}", self.url)))?;
            let status = resp.status();
            let bytes = Limited::new(resp.into_body(), MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| EmbedError::Endpoint(format!("reading the response: {e}")))?
                .to_bytes();
            if !status.is_success() {
                let text = String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned();
                return Err(EmbedError::Endpoint(format!(
                    "{} answered {status}: {text}",
                    self.url
                )));
            }
            Ok(bytes)
        };
        let bytes = self
            .runtime
            .as_ref()
            .ok_or_else(|| EmbedError::Endpoint("the embedder is shutting down".into()))?
            .block_on(async { tokio::time::timeout(self.timeout, call).await })
            .map_err(|_| EmbedError::Timeout(self.timeout))??;
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

impl Drop for OpenAi {
    /// A reload or shutdown can drop the embedder on a thread of the proxy's runtime, where dropping a
    /// runtime would panic; shutting it down in the background is allowed anywhere.
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
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
