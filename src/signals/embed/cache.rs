//! The embedding cache shared by the costly embedders (`openai`, `local`): vectors kept in an LRU keyed
//! by a hash of the text, so a chunk retrieved again and again is embedded once.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use lru::LruCache;
use sha2::{Digest, Sha256};

use crate::signals::embed::EmbedError;

/// 128 bits of SHA-256: collisions are out of reach, and a key is as small as a pointer pair.
type Key = [u8; 16];

pub struct VectorCache {
    /// `None` when `cache_entries = 0`: every text is embedded every time.
    map: Option<Mutex<LruCache<Key, Arc<Vec<f32>>>>>,
}

impl VectorCache {
    /// A cache of at most `entries` vectors; 0 turns caching off.
    pub fn new(entries: usize) -> Self {
        VectorCache {
            map: NonZeroUsize::new(entries).map(|n| Mutex::new(LruCache::new(n))),
        }
    }

    /// One vector per text, in order: cached ones from the cache, the others computed by `compute` —
    /// each distinct missing text once, in batches of at most `max_batch` — and then cached.
    pub fn embed_through(
        &self,
        texts: &[&str],
        max_batch: usize,
        mut compute: impl FnMut(&[&str]) -> Result<Vec<Vec<f32>>, EmbedError>,
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        let keys: Vec<Key> = texts.iter().map(|t| text_key(t)).collect();
        let mut out: Vec<Option<Arc<Vec<f32>>>> = match &self.map {
            Some(map) => {
                let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
                keys.iter().map(|k| map.get(k).cloned()).collect()
            }
            None => vec![None; texts.len()],
        };
        let mut missing: Vec<usize> = Vec::new();
        for (i, v) in out.iter().enumerate() {
            if v.is_none() && !missing.iter().any(|&j| keys[j] == keys[i]) {
                missing.push(i);
            }
        }
        for batch in missing.chunks(max_batch.max(1)) {
            let batch_texts: Vec<&str> = batch.iter().map(|&i| texts[i]).collect();
            let vectors = compute(&batch_texts)?;
            if vectors.len() != batch.len() {
                return Err(EmbedError::Count {
                    expected: batch.len(),
                    got: vectors.len(),
                });
            }
            let mut map = self
                .map
                .as_ref()
                .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()));
            for (&i, v) in batch.iter().zip(vectors) {
                let v = Arc::new(v);
                if let Some(map) = map.as_mut() {
                    map.put(keys[i], v.clone());
                }
                for (slot, key) in out.iter_mut().zip(&keys) {
                    if slot.is_none() && *key == keys[i] {
                        *slot = Some(v.clone());
                    }
                }
            }
        }
        out.into_iter()
            .map(|v| {
                v.map(|v| v.as_ref().clone())
                    .ok_or_else(|| EmbedError::Malformed("embedding missing".into()))
            })
            .collect()
    }

    /// Vectors held.
    pub fn len(&self) -> usize {
        self.map
            .as_ref()
            .map_or(0, |m| m.lock().unwrap_or_else(|p| p.into_inner()).len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn text_key(text: &str) -> Key {
    let digest = Sha256::digest(text.as_bytes());
    let mut key = [0u8; 16];
    key.copy_from_slice(&digest[..16]);
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lengths(texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        Ok(texts.iter().map(|t| vec![t.len() as f32]).collect())
    }

    #[test]
    fn computes_each_distinct_text_once_and_then_never() {
        let cache = VectorCache::new(10);
        let calls: std::cell::RefCell<Vec<Vec<String>>> = Default::default();
        let compute = |texts: &[&str]| {
            calls
                .borrow_mut()
                .push(texts.iter().map(|t| t.to_string()).collect());
            lengths(texts)
        };
        let v = cache
            .embed_through(&["a", "bb", "a", "ccc"], 2, compute)
            .unwrap();
        assert_eq!(v, vec![vec![1.0], vec![2.0], vec![1.0], vec![3.0]]);
        assert_eq!(*calls.borrow(), vec![vec!["a", "bb"], vec!["ccc"]]);
        let v = cache.embed_through(&["ccc", "a"], 2, compute).unwrap();
        assert_eq!(v, vec![vec![3.0], vec![1.0]]);
        assert_eq!(calls.borrow().len(), 2, "all cached: no new call");
        assert_eq!(cache.len(), 3);
    }

    #[test]
    fn evicts_least_recently_used_and_zero_disables() {
        let cache = VectorCache::new(2);
        let mut n = 0;
        let mut compute = |texts: &[&str]| {
            n += texts.len();
            lengths(texts)
        };
        cache.embed_through(&["a", "bb"], 8, &mut compute).unwrap();
        cache.embed_through(&["a"], 8, &mut compute).unwrap();
        cache.embed_through(&["ccc"], 8, &mut compute).unwrap(); // evicts "bb"
        cache.embed_through(&["a", "bb"], 8, &mut compute).unwrap();
        assert_eq!(n, 4);

        let off = VectorCache::new(0);
        let mut m = 0;
        for _ in 0..3 {
            off.embed_through(&["a", "a"], 8, |t: &[&str]| {
                m += t.len();
                lengths(t)
            })
            .unwrap();
        }
        assert_eq!(
            m, 3,
            "without a cache each call still embeds a repeated text once"
        );
        assert!(off.is_empty());
    }

    #[test]
    fn a_wrong_count_is_an_error() {
        let cache = VectorCache::new(4);
        let err = cache
            .embed_through(&["a", "b"], 8, |_: &[&str]| Ok(vec![vec![1.0]]))
            .unwrap_err();
        assert!(matches!(
            err,
            EmbedError::Count {
                expected: 2,
                got: 1
            }
        ));
    }
}
