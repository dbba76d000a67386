//! Against the real all-MiniLM-L6-v2 weights (`.ci/run` unpacks them; see [`model_dir`]).

use super::*;
use crate::signals::embed::cosine;

/// The fixture folder: `DRIFTGUARD_TEST_MODEL` or `target/fixtures/all-MiniLM-L6-v2`. Absent outside CI
/// the tests skip (saying so); in CI they fail.
pub(crate) fn model_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("DRIFTGUARD_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fixtures/all-MiniLM-L6-v2")
        });
    if dir.join("model.safetensors").is_file() {
        return Some(dir);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "the all-MiniLM-L6-v2 fixture is missing at {} (.ci/run unpacks it)",
        dir.display()
    );
    eprintln!(
        "SKIPPED: no model at {} (run the model step of .ci/run to fetch all-MiniLM-L6-v2)",
        dir.display()
    );
    None
}

#[test]
fn minilm_matches_sentence_transformers() {
    let Some(dir) = model_dir() else { return };
    let model = Local::load(&dir, 256, 0).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(model.dims(), 384);
    assert_eq!(model.pooling(), Pooling::Mean);
    let texts = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The new movie is awesome for the whole family.",
        "",
    ];
    let batch = model.embed_batch(&texts).unwrap();
    let same = cosine(&batch[0], &batch[1]);
    assert!((same - 0.755).abs() < 0.01, "cos(food, bread) = {same}");
    let unrelated = cosine(&batch[0], &batch[2]);
    assert!(unrelated.abs() < 0.15, "cos(food, movie) = {unrelated}");
    eprintln!("cos(food, bread) = {same:.4}; cos(food, movie) = {unrelated:.4}");
    for (text, vector) in texts.iter().zip(&batch).take(3) {
        let norm: f32 = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "{text}: |v| = {norm}");
        let single = model.embed(text).unwrap();
        let diff = single
            .iter()
            .zip(vector)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(diff < 1e-4, "{text}: batch and single differ by {diff}");
    }
    assert!(
        batch[3].iter().all(|&x| x == 0.0),
        "an empty text is the zero vector"
    );
}

/// The int8 linear layers (where the CPU has AVX-512 VNNI) keep every vector within a cosine of 0.99
/// of the f32 model's, and the similarities between texts within 0.02 of the f32 ones.
#[test]
fn int8_vectors_stay_close_to_the_f32_ones() {
    let Some(dir) = model_dir() else { return };
    let int8 = Local::load_with(&dir, 128, 0, Precision::Int8).unwrap_or_else(|e| panic!("{e}"));
    let exact = Local::load_with(&dir, 128, 0, Precision::F32).unwrap_or_else(|e| panic!("{e}"));
    let texts = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The new movie is awesome for the whole family.",
        "How do I roll back the canary when the index alias points at the wrong version?",
        "The index alias is a pointer from a stable name, such as docs_current, to one physical \
         index version. Re-indexing builds a new version next to the old one and flips the alias \
         when the build is verified. If the alias points at the wrong version, answers cite \
         passages that no longer exist or miss new ones entirely.",
        "Coverage measures how much of an answer is grounded in the retrieved passages: the share \
         of its content words, after stemming, that also appear in the chunks.",
        "Preheat the oven to 200 degrees, then bake the bread for forty minutes until golden.",
    ];
    let a = int8.embed_batch(&texts).unwrap();
    let b = exact.embed_batch(&texts).unwrap();
    let mut worst = 1.0f32;
    for (text, (a, b)) in texts.iter().zip(a.iter().zip(&b)) {
        let c = cosine(a, b);
        worst = worst.min(c);
        assert!(c >= 0.99, "{text:?}: cosine(int8, f32) = {c}");
    }
    let mut drift = 0.0f32;
    for i in 0..texts.len() {
        for j in i + 1..texts.len() {
            drift = drift.max((cosine(&a[i], &a[j]) - cosine(&b[i], &b[j])).abs());
        }
    }
    assert!(drift < 0.02, "pairwise similarities moved by {drift}");
    eprintln!("int8 vs f32: worst cosine {worst:.5}, largest pairwise change {drift:.5}");
}

#[test]
fn long_inputs_are_truncated_at_max_tokens() {
    let Some(dir) = model_dir() else { return };
    let model = Local::load(&dir, 16, 0).unwrap_or_else(|e| panic!("{e}"));
    let head = "The river flooded the valley after a week of heavy rain and the farmers";
    let long = format!(
        "{head} {}",
        "moved their cattle to higher ground. ".repeat(200)
    );
    let tail_differs = format!(
        "{head} {}",
        "sold bonds on the stock exchange. ".repeat(200)
    );
    let v = model.embed_batch(&[&long, &tail_differs]).unwrap();
    let diff = v[0]
        .iter()
        .zip(&v[1])
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff < 1e-5, "only the first 16 tokens count: {diff}");
}

#[test]
fn the_cache_embeds_a_repeated_text_once() {
    let Some(dir) = model_dir() else { return };
    let model = Local::load(&dir, 64, 100).unwrap_or_else(|e| panic!("{e}"));
    let first = model
        .embed_batch(&["question one", "a chunk", "an answer"])
        .unwrap();
    assert_eq!(model.cache.len(), 3);
    let again = model
        .embed_batch(&["question two", "a chunk", "an answer"])
        .unwrap();
    assert_eq!(model.cache.len(), 4);
    assert_eq!(first[1], again[1]);
}

fn copy_model(dir: &Path, to: &Path) {
    std::fs::create_dir_all(to.join("1_Pooling")).unwrap();
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "1_Pooling/config.json",
    ] {
        std::fs::copy(dir.join(file), to.join(file)).unwrap();
    }
}

#[test]
fn broken_folders_are_errors_that_name_the_file() {
    let Some(dir) = model_dir() else { return };
    let scratch = std::env::temp_dir().join(format!("driftguard-broken-{}", std::process::id()));
    type Break = fn(&Path);
    let cases: [(&str, Break, &str, &str); 6] = [
        (
            "no-tokenizer",
            |d| std::fs::remove_file(d.join("tokenizer.json")).unwrap(),
            "tokenizer.json",
            "missing",
        ),
        (
            "no-weights",
            |d| std::fs::remove_file(d.join("model.safetensors")).unwrap(),
            "model.safetensors",
            "",
        ),
        (
            "truncated",
            |d| {
                let bytes = std::fs::read(d.join("model.safetensors")).unwrap();
                std::fs::write(d.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
            },
            "model.safetensors",
            "not a safetensors file",
        ),
        (
            "hidden-size",
            |d| {
                let text = std::fs::read_to_string(d.join("config.json")).unwrap();
                std::fs::write(
                    d.join("config.json"),
                    text.replace("\"hidden_size\": 384", "\"hidden_size\": 768"),
                )
                .unwrap();
                let pooling = std::fs::read_to_string(d.join("1_Pooling/config.json")).unwrap();
                std::fs::write(
                    d.join("1_Pooling/config.json"),
                    pooling.replace("384", "768"),
                )
                .unwrap();
            },
            "model.safetensors",
            "does not match config.json",
        ),
        (
            "bad-json",
            |d| std::fs::write(d.join("config.json"), "{\"hidden_size\": ").unwrap(),
            "config.json",
            "bad JSON",
        ),
        (
            "pooling",
            |d| {
                std::fs::write(
                    d.join("1_Pooling/config.json"),
                    "{\"pooling_mode_max_tokens\": true}",
                )
                .unwrap()
            },
            "1_Pooling/config.json",
            "pooling_mode",
        ),
    ];
    for (name, break_it, file, says) in cases {
        let folder = scratch.join(name);
        copy_model(&dir, &folder);
        break_it(&folder);
        let err = match Local::load(&folder, 256, 0) {
            Ok(_) => panic!("{name}: a broken model loaded"),
            Err(e) => e,
        };
        assert!(err.file.ends_with(file), "{name}: {err}");
        assert!(err.to_string().contains(says), "{name}: {err}");
        assert!(!err.to_string().contains('\n'), "{name}: one line: {err}");
    }
    let _ = std::fs::remove_dir_all(&scratch);
    let err = Local::load(&scratch.join("nowhere"), 256, 0).err().unwrap();
    assert!(err.to_string().contains("no such directory"), "{err}");
}
