//! Unit tests of the `hashed` embedder: its features, its fixed hash, and the word splitter it shares
//! with coverage; plus the vector operations of `embed`.

use super::*;
use crate::signals::embed::*;

/// A 3-gram packed as the embedder packs it.
fn pack(gram: &str) -> u64 {
    gram.chars()
        .fold(0, |packed, c| (packed << 21) | u64::from(u32::from(c)))
}

/// The vector of a text rebuilt from its [`features`] list, hashing each feature from its string.
fn vector_from_features(text: &str) -> Vec<f32> {
    let mut words = Words::default();
    words.split(text);
    let n = words.len();
    let mut tf: Vec<(u64, u32)> = Vec::new();
    for (i, feature) in features(text).iter().enumerate() {
        let hash = if i < n {
            word_hash(feature)
        } else if i < 2 * n - 1 {
            let (a, b) = feature.split_once(' ').expect("a bigram is two words");
            bigram_hash(word_hash(a), word_hash(b))
        } else {
            trigram_hash(pack(feature))
        };
        match tf.iter_mut().find(|(h, _)| *h == hash) {
            Some((_, count)) => *count += 1,
            None => tf.push((hash, 1)),
        }
    }
    let mut sum = vec![0.0f64; DIMS];
    for (hash, count) in tf {
        let weight = 1.0 + f64::from(count).ln();
        sum[(hash % DIMS as u64) as usize] += if hash >> 63 == 1 { -weight } else { weight };
    }
    let norm = sum.iter().map(|x| x * x).sum::<f64>().sqrt();
    sum.iter()
        .map(|x| if norm == 0.0 { 0.0 } else { (x / norm) as f32 })
        .collect()
}

fn non_zero(v: &[f32]) -> Vec<(usize, f32)> {
    v.iter()
        .copied()
        .enumerate()
        .filter(|(_, x)| *x != 0.0)
        .collect()
}

fn norm(v: &[f32]) -> f64 {
    v.iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt()
}

#[test]
fn features_of_hi_there_hi() {
    let words = ["hi", "there", "hi"];
    let bigrams = ["hi there", "there hi"]; // across the comma
    let grams = [
        "<hi", "hi>", "<th", "the", "her", "ere", "re>", "<hi", "hi>",
    ];
    let expected: Vec<&str> = words
        .iter()
        .chain(&bigrams)
        .chain(&grams)
        .copied()
        .collect();
    assert_eq!(features("Hi there, hi!"), expected);
}

#[test]
fn three_grams_of_short_long_and_non_ascii_words() {
    assert_eq!(features("a"), ["a", "<a>"]);
    assert_eq!(features("ab"), ["ab", "<ab", "ab>"]);
    assert_eq!(features("Word"), ["word", "<wo", "wor", "ord", "rd>"]);
    // Over chars, not bytes; lowercased.
    assert_eq!(
        features("STRASSE")[1..],
        ["<st", "str", "tra", "ras", "ass", "sse", "se>"]
    );
    assert_eq!(
        features("Straße")[1..],
        ["<st", "str", "tra", "raß", "aße", "ße>"]
    );
    assert_eq!(features("Ωμέγα")[0], "ωμέγα");
}

#[test]
fn words_are_alphanumeric_runs() {
    assert_eq!(
        features("gpt4o, v2.1 foo_bar")[..6],
        ["gpt4o", "v2", "1", "foo", "bar", "gpt4o v2"]
    );
    assert_eq!(features("don't")[..3], ["don", "t", "don t"]);
    assert!(features("  ,.!? -- ").is_empty());
}

#[test]
fn streamed_hashing_matches_the_feature_list() {
    for text in [
        "Hi there, hi!",
        "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs.",
        "Straße, ÉCOLE, Ωμέγα, 東京 and İstanbul: unicode words 42 times.",
        "a b a b a b",
        "one",
    ] {
        let streamed = Hashed.vector(text);
        let rebuilt = vector_from_features(text);
        for (i, (a, b)) in streamed.iter().zip(&rebuilt).enumerate() {
            assert!((a - b).abs() < 1e-6, "{text:?} dim {i}: {a} vs {b}");
        }
    }
}

#[test]
fn one_word_vector_has_one_plus_ln_tf_weights() {
    // banana: the word and the 3-grams <ba ban ana nan ana na> — 6 distinct features, `ana` twice.
    let v = Hashed.vector("banana");
    let dims = non_zero(&v);
    assert_eq!(
        dims.len(),
        6,
        "6 distinct features in 6 distinct dims (no index collision here)"
    );
    let mut weights: Vec<f64> = dims.iter().map(|&(_, x)| f64::from(x.abs())).collect();
    weights.sort_by(f64::total_cmp);
    let raw = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0 + 2f64.ln()];
    let raw_norm = raw.iter().map(|w| w * w).sum::<f64>().sqrt();
    for (got, w) in weights.iter().zip(raw) {
        assert!(
            (got - w / raw_norm).abs() < 1e-6,
            "{got} vs {}",
            w / raw_norm
        );
    }
    assert!((norm(&v) - 1.0).abs() < 1e-6);

    // hi hi hi: hi ×3, "hi hi" ×2, <hi ×3, hi> ×3.
    let v = Hashed.vector("hi hi hi");
    let dims = non_zero(&v);
    assert_eq!(dims.len(), 4);
    let (w3, w2) = (1.0 + 3f64.ln(), 1.0 + 2f64.ln());
    let raw_norm = (3.0 * w3 * w3 + w2 * w2).sqrt();
    let bigram = (bigram_hash(word_hash("hi"), word_hash("hi")) % DIMS as u64) as usize;
    for (i, x) in dims {
        let expected = if i == bigram { w2 } else { w3 } / raw_norm;
        assert!(
            (f64::from(x.abs()) - expected).abs() < 1e-6,
            "dim {i}: {x} vs {expected}"
        );
    }
}

#[test]
fn case_and_punctuation_do_not_change_the_vector() {
    assert_eq!(Hashed.vector("Hello, World!"), Hashed.vector("hello world"));
}

#[test]
fn texts_without_words_are_the_zero_vector() {
    for text in ["", "   ", ",.;:!? -- ()"] {
        let v = Hashed.vector(text);
        assert_eq!(v.len(), DIMS);
        assert!(v.iter().all(|&x| x == 0.0), "{text:?}");
    }
}

/// The values below were computed once; a change to the hash, the seed, the word split or the
/// byte order would change them. Passing on any platform proves vectors are the same everywhere.
#[test]
fn hash_is_fixed_across_platforms_and_runs() {
    assert_eq!(word_hash("hello"), 0xa5fb_a9b0_ec27_1172);
    assert_eq!(word_hash("hi"), 0xd6b6_8439_c0bb_2d3a);
    assert_eq!(word_hash("the"), 0x9de6_823e_a5d5_d972);
    assert_eq!(trigram_hash(pack("<he")), 0xa01d_e79d_25d5_c047);
    assert_eq!(
        bigram_hash(word_hash("hello"), word_hash("world")),
        0x1bee_d997_048b_c7da
    );

    // 48 distinct features land in 45 dims.
    let expected: [(usize, i8); 45] = [
        (18, 1),
        (22, 1),
        (26, 1),
        (44, 1),
        (62, -1),
        (66, -1),
        (89, 1),
        (136, 1),
        (185, -1),
        (205, -1),
        (241, -1),
        (253, 1),
        (257, -1),
        (282, -1),
        (303, 1),
        (328, 1),
        (344, -1),
        (362, 1),
        (370, -1),
        (374, 1),
        (384, 1),
        (406, 1),
        (416, -1),
        (433, -1),
        (449, 1),
        (470, 1),
        (493, -1),
        (546, -1),
        (579, -1),
        (584, -1),
        (590, -1),
        (592, -1),
        (636, 1),
        (733, 1),
        (768, -1),
        (790, -1),
        (795, 1),
        (809, 1),
        (828, 1),
        (833, -1),
        (867, 1),
        (905, -1),
        (909, -1),
        (925, 1),
        (988, -1),
    ];
    let v = Hashed.vector("The quick brown fox jumps over the lazy dog.");
    let got: Vec<(usize, i8)> = non_zero(&v)
        .into_iter()
        .map(|(i, x)| (i, if x > 0.0 { 1 } else { -1 }))
        .collect();
    assert_eq!(got, expected);
}

#[test]
fn hash_spreads_evenly_over_dims_and_signs() {
    let mut buckets = vec![0u32; DIMS];
    let mut negative = 0;
    for a in 'a'..='z' {
        for b in 'a'..='z' {
            for c in 'a'..='z' {
                let h = trigram_hash(pack(&format!("{a}{b}{c}")));
                buckets[(h % DIMS as u64) as usize] += 1;
                negative += h >> 63;
            }
        }
    }
    let n = 26.0f64.powi(3);
    let mean = n / DIMS as f64;
    let variance = buckets
        .iter()
        .map(|&b| (f64::from(b) - mean).powi(2))
        .sum::<f64>()
        / DIMS as f64;
    // Uniform random placement gives a Poisson count per dim: variance ≈ mean.
    assert!(
        (variance / mean - 1.0).abs() < 0.25,
        "variance {variance}, mean {mean}"
    );
    assert!(
        (negative as f64 / n - 0.5).abs() < 0.02,
        "{negative} negative of {n}"
    );
}

#[test]
fn cosine_and_centroid_by_hand() {
    assert_eq!(cosine(&[1.0, 0.0, 0.0], &[1.0, 0.0, 0.0]), 1.0);
    assert_eq!(cosine(&[1.0, 0.0], &[0.0, 3.0]), 0.0);
    assert_eq!(cosine(&[1.0, 0.0], &[-2.0, 0.0]), -1.0);
    assert!((cosine(&[1.0, 0.0], &[1.0, 1.0]) - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-7);
    assert!((cosine(&[3.0, 4.0], &[4.0, 3.0]) - 24.0 / 25.0).abs() < 1e-7);
    assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), 0.0, "zero vector");
    assert_eq!(
        cosine(&[1.0, 0.0], &[1.0, 0.0, 0.0]),
        0.0,
        "different lengths"
    );

    let c = centroid(&[vec![1.0, 0.0], vec![0.0, 1.0]]);
    let h = std::f32::consts::FRAC_1_SQRT_2;
    assert!((c[0] - h).abs() < 1e-7 && (c[1] - h).abs() < 1e-7, "{c:?}");
    assert_eq!(centroid(&[vec![0.0, 2.0], vec![0.0, 3.0]]), [0.0, 1.0]);
    assert_eq!(
        centroid(&[vec![1.0, 0.0], vec![-1.0, 0.0]]),
        [0.0, 0.0],
        "zero sum → zero vector"
    );
    assert!(centroid(&[]).is_empty());
}

#[test]
fn embedder_is_object_safe_and_batches_in_order() {
    let embedder: Box<dyn Embedder> = Box::new(Hashed);
    assert_eq!(embedder.name(), "hashed");
    let batch = embedder
        .embed_batch(&["first text", "second text"])
        .expect("hashed never fails");
    assert_eq!(
        batch,
        [Hashed.vector("first text"), Hashed.vector("second text")]
    );
    assert_eq!(
        embedder.embed("first text").expect("hashed never fails"),
        batch[0]
    );
}

#[test]
fn default_embed_rejects_a_wrong_vector_count() {
    struct Broken;
    impl Embedder for Broken {
        fn name(&self) -> &'static str {
            "broken"
        }
        fn embed_batch(&self, _: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
            Ok(vec![vec![1.0], vec![2.0]])
        }
    }
    match Broken.embed("x") {
        Err(EmbedError::Count {
            expected: 1,
            got: 2,
        }) => {}
        other => panic!("{other:?}"),
    }
}

/// The words of `text` char by char, the slow obvious way: (lowercased word, chars).
fn reference_words(text: &str) -> Vec<(String, usize)> {
    let mut words = Vec::new();
    let (mut word, mut chars) = (String::new(), 0);
    for c in text.chars() {
        if c.is_alphanumeric() {
            for lower in c.to_lowercase() {
                word.push(lower);
                chars += 1;
            }
        } else if !word.is_empty() {
            words.push((std::mem::take(&mut word), chars));
            chars = 0;
        }
    }
    if !word.is_empty() {
        words.push((word, chars));
    }
    words
}

#[test]
fn split_matches_a_char_by_char_reference() {
    // Mostly ASCII (the 8-byte path), with the bytes on each side of the letter and digit ranges,
    // and chars that lowercase to more bytes or to two chars (the char path).
    let alphabet: Vec<char> = "aaaaeeeettttssssnnnnZZQ0099      ,,..\n@[`{/:\u{7f}\0_-"
        .chars()
        .chain(['é', 'İ', 'Σ', '東', '\u{301}', 'ß', '½', '١', 'Ⅻ', 'ǅ'])
        .collect();
    let mut rng = fastrand::Rng::with_seed(7);
    let mut words = Words::default();
    for len in 0..120 {
        for _ in 0..30 {
            let text: String = (0..len)
                .map(|_| alphabet[rng.usize(..alphabet.len())])
                .collect();
            words.split(&text);
            let got: Vec<(String, usize)> = words
                .iter()
                .map(|w| (w.text.to_string(), w.chars))
                .collect();
            assert_eq!(got, reference_words(&text), "{text:?}");
            for word in words.iter() {
                let bytes = word.text.as_bytes();
                let head = bytes
                    .iter()
                    .take(8)
                    .rev()
                    .fold(0u64, |h, &b| (h << 8) | u64::from(b));
                let tail = bytes[bytes.len().saturating_sub(8)..]
                    .iter()
                    .fold(0u64, |t, &b| (t << 8) | u64::from(b));
                assert_eq!(
                    (word.head, word.tail),
                    (head, tail),
                    "{:?} in {text:?}",
                    word.text
                );
                assert_eq!(word.hash_prefix(WORD, bytes.len()), word_hash(word.text));
            }
        }
    }
}

/// Vectors of texts that take every path of the split and the feature loop (ASCII blocks, non-ASCII
/// chars, words longer than 8 bytes, repeats past the tf table, digits), bit for bit as a checksum
/// over (dim, f32 bits), computed once with the reference implementation.
#[test]
fn vectors_are_pinned_bit_for_bit() {
    let long = "repeat ".repeat(80);
    let texts = [
        "The quick brown fox jumps over the lazy dog.",
        "Der Größenindex wird über die Straße zurückgesetzt: naïve Cafés, ΣΊΣΥΦΟΣ und Ωμέγα.",
        "Version pins: BUILD_ID, GIT_SHA, MODEL_VER, INDEX_HASH 4711; internationalisation-ready!",
        long.as_str(),
        "",
    ];
    let sums: Vec<u64> = texts
        .iter()
        .map(|text| {
            Hashed
                .vector(text)
                .iter()
                .enumerate()
                .fold(0xcbf2_9ce4_8422_2325u64, |h, (i, x)| {
                    (h ^ ((i as u64) << 32 | u64::from(x.to_bits()))).wrapping_mul(0x0100_0000_01b3)
                })
        })
        .collect();
    assert_eq!(sums, PINNED_SUMS);
}

const PINNED_SUMS: [u64; 5] = [
    0xfe66_e665_45ef_f465,
    0xa32e_131e_141e_191f,
    0x4144_a797_070a_2e43,
    0x915b_f73a_791f_023c,
    0x70f4_dd63_df28_7325,
];
