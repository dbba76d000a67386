//! The real-text RAG set of tests/fixtures/python_faq_rag.json (questions, retrieved passages and
//! answers written by people: the Python FAQ, rebuilt by tests/fixtures/build_python_faq.py) and the
//! three ways the tests pair its pieces: grounded, ungrounded answer, wrong retrieval.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct Item {
    pub id: String,
    pub question: String,
    pub chunks: Vec<String>,
    pub answer: String,
}

#[derive(Deserialize)]
struct File {
    items: Vec<Item>,
}

/// Every item of the fixture.
pub fn items() -> Vec<Item> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/python_faq_rag.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let file: File = serde_json::from_str(&text).expect("python_faq_rag.json parses");
    file.items
}

/// One exchange as a RAG service would send it: the question asked, the chunks retrieved, the answer.
#[derive(Debug, Clone)]
pub struct Exchange<'a> {
    pub question: &'a str,
    pub chunks: &'a [String],
    pub answer: &'a str,
}

/// How an exchange is put together from the set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pairing {
    /// The item's own chunks and answer.
    Grounded,
    /// The item's own chunks, another item's answer (an answer not supported by what was retrieved).
    UngroundedAnswer,
    /// Another item's chunks and that item's answer: the index returned another document and the
    /// answer is faithful to it.
    WrongRetrieval,
}

/// Exchange `i` of the set under `pairing`; the other item is half the set away, so it is about
/// another topic.
pub fn exchange(items: &[Item], i: usize, pairing: Pairing) -> Exchange<'_> {
    let n = items.len();
    let own = &items[i % n];
    let other = &items[(i + n / 2) % n];
    match pairing {
        Pairing::Grounded => Exchange {
            question: &own.question,
            chunks: &own.chunks,
            answer: &own.answer,
        },
        Pairing::UngroundedAnswer => Exchange {
            question: &own.question,
            chunks: &own.chunks,
            answer: &other.answer,
        },
        Pairing::WrongRetrieval => Exchange {
            question: &own.question,
            chunks: &other.chunks,
            answer: &other.answer,
        },
    }
}

/// The model folder of the `local` embedder: `DRIFTGUARD_TEST_MODEL` or
/// `target/fixtures/all-MiniLM-L6-v2`, when its weights are there.
pub fn model_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("DRIFTGUARD_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fixtures/all-MiniLM-L6-v2")
        });
    dir.join("model.safetensors").is_file().then_some(dir)
}

/// Area under the ROC curve of "bad scores higher than good": P(bad > good) + ½ P(tie).
pub fn auc(good: &[f64], bad: &[f64]) -> f64 {
    let mut wins = 0.0;
    for b in bad {
        for g in good {
            wins += if b > g {
                1.0
            } else if b == g {
                0.5
            } else {
                0.0
            };
        }
    }
    wins / (good.len() * bad.len()) as f64
}

/// Nearest-rank quantile.
pub fn quantile(values: &[f64], q: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}
