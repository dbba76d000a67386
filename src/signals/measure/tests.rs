//! Unit tests of the SPEC §3 measures: ΔS probes, coverage, λ and tool loops.

use std::collections::HashSet;
use std::f64::consts::FRAC_1_SQRT_2;

use super::*;
use crate::signals::embed::Hashed;

fn call(name: &str, arguments: &str) -> ToolCall {
    ToolCall {
        name: name.into(),
        arguments: arguments.into(),
    }
}

// === ΔS ===

#[test]
fn delta_s_by_hand() {
    assert_eq!(delta_s(&[1.0, 0.0], &[2.0, 0.0]), 0.0);
    assert_eq!(delta_s(&[1.0, 0.0], &[0.0, 1.0]), 1.0);
    assert!((delta_s(&[1.0, 0.0], &[1.0, 1.0]) - (1.0 - FRAC_1_SQRT_2)).abs() < 1e-12);
    assert_eq!(
        delta_s(&[1.0, 0.0], &[-1.0, 0.0]),
        1.0,
        "cos −1 clamps to 1"
    );
    assert_eq!(delta_s(&[0.0, 0.0], &[1.0, 0.0]), 1.0, "zero vector");
    assert_eq!(delta_s(&[1.0, 0.0], &[0.0, 0.0]), 1.0, "zero vector");
    assert_eq!(delta_s(&[0.0, 0.0], &[0.0, 0.0]), 1.0, "both zero");
    assert_eq!(delta_s(&[1.0, f32::NAN], &[1.0, 0.0]), 1.0, "not finite");
}

#[test]
fn delta_s_of_identical_text_is_zero() {
    let text = "The index alias points at docs_vB; rerank uses bge-v2 and k = 8.";
    let v = Hashed.vector(text);
    assert_eq!(delta_s(&v, &v), 0.0);
    assert_eq!(delta_s(&v, &Hashed.vector(&text.to_uppercase())), 0.0);
}

#[test]
fn delta_s_of_disjoint_vocabularies_is_one() {
    // No shared word, bigram or 3-gram, so the features are disjoint and cos can only be non-zero
    // through two features landing on the same dim (~12 × 9 / 1024 ≈ 0.1 such pairs expected for
    // texts this size). For these two texts no dim is shared, so ΔS is exactly 1; a collision would
    // pull it below 1 by about w₁w₂ / (|a||b|), hence the weaker bound stated first.
    let (a, b) = (Hashed.vector("alpha beta"), Hashed.vector("xyz qqq"));
    let ds = delta_s(&a, &b);
    assert!(ds >= 0.99, "{ds}");
    let shared = a
        .iter()
        .zip(&b)
        .filter(|(x, y)| **x != 0.0 && **y != 0.0)
        .count();
    assert_eq!(shared, 0);
    assert_eq!(ds, 1.0);
}

#[test]
fn delta_s_probes_by_hand() {
    let question = [1.0, 0.0, 0.0];
    let chunks = [vec![0.0, 1.0, 0.0], vec![0.0, 0.0, 1.0]];
    let anchor = [0.0, 1.0, 0.0];
    let p = delta_s_probes(&question, &chunks, &anchor);
    assert_eq!(p.qr, 1.0);
    assert!((p.ra - (1.0 - FRAC_1_SQRT_2)).abs() < 1e-6, "{p:?}");
    assert_eq!(p.max, 1.0);

    let p = delta_s_probes(&[0.0, 1.0, 1.0], &chunks, &[0.0, 1.0, 0.0]);
    assert!(p.qr.abs() < 1e-6 && p.max == p.ra, "{p:?}");

    let none = delta_s_probes(&question, &[], &anchor);
    assert_eq!(
        none,
        DeltaS {
            qr: 1.0,
            ra: 1.0,
            max: 1.0
        },
        "no chunks: C is zero"
    );
}

// === Bands and λ ===

#[test]
fn bands_at_each_edge() {
    let cases = [
        (0.0, Band::Stable),
        (0.399, Band::Stable),
        (0.40, Band::Transitional),
        (0.1 + 0.3, Band::Transitional),
        (1.0 - 0.6, Band::Transitional),
        (0.4 - 1e-12, Band::Transitional),
        (0.599, Band::Transitional),
        (0.60, Band::Risk),
        (1.0 - 0.4, Band::Risk),
        (0.849, Band::Risk),
        (0.85, Band::Danger),
        (1.0 - 0.15, Band::Danger),
        (1.0, Band::Danger),
        (f64::NAN, Band::Danger),
    ];
    for (ds, expected) in cases {
        assert_eq!(band(ds), expected, "ΔS {ds}");
    }
    let names: Vec<&str> = Band::ALL.iter().map(|b| b.as_str()).collect();
    assert_eq!(names, ["stable", "transitional", "risk", "danger"]);
}

#[test]
fn lambda_at_each_edge() {
    let cases = [
        (0.50, 0.48, Lambda::Convergent), // Delta = −0.02 exactly on the edge
        (0.50, 0.30, Lambda::Convergent),
        (0.50, 0.481, Lambda::Recursive),
        (0.50, 0.50, Lambda::Recursive),
        (0.50, 0.519, Lambda::Recursive),
        (0.50, 0.52, Lambda::Divergent), // 0.52 − 0.50 = 0.020000000000000018
        (0.30, 0.32, Lambda::Divergent), // 0.32 − 0.30 = 0.020000000000000018
        (0.10, 0.12, Lambda::Divergent), // 0.12 − 0.10 = 0.019999999999999990
        (0.50, 0.53, Lambda::Divergent),
        (0.50, 0.54, Lambda::Divergent), // Delta = 0.04 on the edge
        (0.13, 0.17, Lambda::Divergent), // 0.17 − 0.13 = 0.04000000000000001
        (0.50, 0.541, Lambda::Chaotic),
        (0.00, 1.00, Lambda::Chaotic),
        (0.50, f64::NAN, Lambda::Recursive),
    ];
    for (previous, last, expected) in cases {
        assert_eq!(lambda(previous, last), expected, "{previous} → {last}");
    }
}

#[test]
fn lambda_on_every_two_decimal_step() {
    // Every pair of ΔS values on the 0.01 grid: the band must follow the exact decimal Delta, however
    // the f64 subtraction rounds.
    for p in 0..=100 {
        for step in -8i32..=8 {
            let l = p + step;
            if !(0..=100).contains(&l) {
                continue;
            }
            let expected = match step {
                ..=-2 => Lambda::Convergent,
                -1..=1 => Lambda::Recursive,
                2..=4 => Lambda::Divergent,
                _ => Lambda::Chaotic,
            };
            let (previous, last) = (f64::from(p) / 100.0, f64::from(l) / 100.0);
            assert_eq!(lambda(previous, last), expected, "{previous} → {last}");
        }
    }
}

#[test]
fn flips_are_divergent_and_chaotic() {
    let flips: Vec<bool> = Lambda::ALL.iter().map(|&l| is_flip(l)).collect();
    assert_eq!(flips, [false, false, true, true]);
    let indices: Vec<usize> = Lambda::ALL.iter().map(|l| l.index()).collect();
    assert_eq!(indices, [0, 1, 2, 3]);
}

// === Coverage ===

#[test]
fn stopword_list_is_sorted_lowercase_and_long_enough_to_matter() {
    assert!(
        STOPWORDS.windows(2).all(|w| w[0] < w[1]),
        "sorted, no duplicates"
    );
    assert!(STOPWORDS
        .iter()
        .all(|w| w.chars().count() >= 3 && *w == w.to_lowercase()));
    assert!(STOPWORDS.len() >= 150, "{}", STOPWORDS.len());
    assert!(is_stopword("the") && is_stopword("yourselves") && is_stopword("about"));
    assert!(!is_stopword("index") && !is_stopword("th"));
}

#[test]
fn stemming_strips_the_first_matching_suffix() {
    let cases = [
        ("indexing", "index"),
        ("indexes", "index"),
        ("indexed", "index"),
        ("index", "index"),
        ("relations", "rel"),
        ("nations", "nations"), // `ations` matches first; only `n` would remain
        ("sing", "sing"),       // only `s` would remain
        ("sings", "sings"),     // `ings` matches first; only `s` would remain
        ("studies", "stud"),
        ("fries", "fries"), // `ies` matches first; `fr` is too short, `s` is not tried
        ("copied", "cop"),
        ("runners", "runn"),
        ("quickly", "quick"),
        ("bus", "bus"),
        ("glass", "glas"),
        ("cafés", "café"), // 3+ chars, not bytes
    ];
    for (word, expected) in cases {
        assert_eq!(stem(word), expected, "{word}");
    }
}

#[test]
fn content_tokens_follow_the_rules() {
    let tokens: Vec<String> =
        content_tokens("The 3 cats, 2024 and a dog's Indexing! Über-fast ２０２４ 12th").collect();
    assert_eq!(tokens, ["cat", "dog", "index", "über", "fast", "12th"]);
    assert_eq!(
        content_tokens("it was there and then, of course not").collect::<Vec<_>>(),
        ["course"]
    );
}

#[test]
fn coverage_counts_distinct_stemmed_tokens() {
    assert_eq!(coverage("indexing indexes indexed", &["index"]), Some(1.0));
    assert_eq!(
        coverage("Cats cats cats and dogs.", &["A cat sat."]),
        Some(0.5)
    );
    assert_eq!(
        coverage("alpha beta gamma delta", &["gamma", "zeta alpha", "beta"]),
        Some(0.75)
    );
    assert_eq!(coverage("alpha beta", &[]), Some(0.0));
}

#[test]
fn coverage_ignores_stopwords_numbers_and_short_words() {
    assert_eq!(coverage("the 2024 results", &["results of it"]), Some(1.0));
    assert_eq!(coverage("It was there and then.", &["anything"]), None);
    assert_eq!(coverage("12345 6789 ok", &["12345"]), None);
    assert_eq!(coverage("", &["text"]), None);
}

#[test]
fn coverage_applies_the_content_rules_to_chunks_too() {
    // `dur` is a content token; `during` stems to it but is a stopword.
    assert_eq!(coverage("dur", &["during"]), Some(0.0));
    // `123s` stems to `123`; a chunk's `123` is all digits, `123s` is not.
    assert_eq!(coverage("123s", &["123"]), Some(0.0));
    assert_eq!(coverage("123s", &["123s"]), Some(1.0));
    // Short chunk words never count, even when they equal a stem.
    assert_eq!(coverage("index", &["ind"]), Some(0.0));
}

#[test]
fn coverage_matches_a_reference_built_from_content_tokens() {
    let answers = [
        "The canary answers with citations from the vB index; rerank was skipped.",
        "Rollback flips the canary weight to zero and rotates the cache namespace.",
        "Straße und Größe: 東京 indexes, ÉCOLE relations, cafés.",
        "nothing here matches anything whatsoever",
    ];
    let chunks = [
        "The index alias docs_vB points at the new index, with citations.",
        "Rerank (bge-v2) was skipped for latency; the canary weight is 5.",
        "straße größe 東京 index école relation café",
    ];
    for answer in answers {
        let wanted: HashSet<String> = content_tokens(answer).collect();
        let have: HashSet<String> = chunks.iter().flat_map(|c| content_tokens(c)).collect();
        let expected =
            wanted.iter().filter(|t| have.contains(*t)).count() as f64 / wanted.len() as f64;
        assert_eq!(coverage(answer, &chunks), Some(expected), "{answer}");
    }
}

#[test]
fn coverage_matches_the_reference_on_random_texts() {
    // Words sharing prefixes, stems and suffixes, stopwords, numbers, case and non-ASCII.
    let vocabulary = [
        "index",
        "indexes",
        "Indexing",
        "INDEXED",
        "indent",
        "the",
        "THE",
        "other",
        "others",
        "123",
        "123s",
        "dur",
        "during",
        "sing",
        "sings",
        "fries",
        "fry",
        "café",
        "cafés",
        "Straße",
        "東京",
        "relation",
        "relations",
        "rel",
        "ab",
        "a",
        "x1",
        "2024",
        "nations",
        "cat",
        "cats",
        "catalog",
        "cataloged",
        "don't",
        "it's",
        "running",
        "runner",
        "runners",
        "quickly",
        "quick",
    ];
    let mut rng = fastrand::Rng::with_seed(11);
    let mut text = |words: usize| -> String {
        (0..words)
            .map(|_| vocabulary[rng.usize(..vocabulary.len())])
            .collect::<Vec<_>>()
            .join(" ")
    };
    for _ in 0..2000 {
        let answer = text(12);
        let chunks: Vec<String> = (0..3).map(|_| text(10)).collect();
        let chunks: Vec<&str> = chunks.iter().map(String::as_str).collect();
        let wanted: HashSet<String> = content_tokens(&answer).collect();
        let have: HashSet<String> = chunks.iter().flat_map(|c| content_tokens(c)).collect();
        let expected = (!wanted.is_empty()).then(|| {
            wanted.iter().filter(|t| have.contains(*t)).count() as f64 / wanted.len() as f64
        });
        assert_eq!(
            coverage(&answer, &chunks),
            expected,
            "{answer:?} vs {chunks:?}"
        );
    }
}

// === Tool loops ===

#[test]
fn tool_loops_in_one_response() {
    let search = call("search", r#"{"q":"x"}"#);
    assert!(loops_in_response(&[
        search.clone(),
        search.clone(),
        search.clone()
    ]));
    assert!(loops_in_response(&[
        search.clone(),
        call("open", "{}"),
        search.clone(),
        search.clone()
    ]));
    assert!(!loops_in_response(&[
        search.clone(),
        search.clone(),
        call("open", "{}")
    ]));
    // Same name, different arguments: different calls.
    assert!(!loops_in_response(&[
        search.clone(),
        search.clone(),
        call("search", r#"{"q":"y"}"#)
    ]));
    assert!(!loops_in_response(&[]));
}

#[test]
fn tool_loops_across_responses() {
    let (a, b) = (call("search", r#"{"q":"x"}"#), call("open", r#"{"id":1}"#));
    let mut session = SessionTools::new();
    assert!(!session.observe(std::slice::from_ref(&a)));
    assert!(!session.observe(&[a.clone(), b.clone()]));
    assert!(
        session.observe(std::slice::from_ref(&a)),
        "a in 3 consecutive responses"
    );
    assert!(session.observe(std::slice::from_ref(&a)), "still looping");

    let mut session = SessionTools::new();
    assert!(!session.observe(std::slice::from_ref(&a)));
    assert!(!session.observe(&[]));
    assert!(!session.observe(std::slice::from_ref(&a)));
    assert!(
        !session.observe(&[a.clone(), b.clone()]),
        "a: 2 in a row, b: 1"
    );
    assert!(!session.observe(std::slice::from_ref(&b)), "b: 2 in a row");

    // Repeats within one response are one response, not a streak.
    let mut session = SessionTools::new();
    assert!(!session.observe(&[a.clone(), a.clone()]));
    assert!(!session.observe(&[a.clone(), a.clone()]));
}

#[test]
fn stemming_by_tail_block_equals_trying_every_suffix_in_order() {
    let naive = |word: &'static str| -> &'static str {
        for suffix in SUFFIXES {
            if let Some(rest) = word.strip_suffix(suffix) {
                return if rest.chars().count() >= 3 {
                    rest
                } else {
                    word
                };
            }
        }
        word
    };
    let stems = ["", "a", "ab", "abc", "abcd", "ét", "été"];
    let endings = SUFFIXES
        .iter()
        .copied()
        .chain(["", "x", "ss", "ng", "ry", "tion", "ings", "ly", "sly"]);
    for ending in endings {
        for stem_part in stems {
            let word: &'static str = Box::leak(format!("{stem_part}{ending}").into_boxed_str());
            assert_eq!(stem(word), naive(word), "{word}");
        }
    }
}
