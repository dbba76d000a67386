//! The pipeline's bound and its worker's scheduling.

use super::*;

fn pipeline(queue: usize) -> (Pipeline, Metrics) {
    let metrics = Metrics::new();
    let config = SignalsConfig {
        queue,
        ..SignalsConfig::default()
    };
    (
        Pipeline::start(&config, &metrics).expect("pipeline"),
        metrics,
    )
}

#[test]
fn a_full_queue_drops_a_sample_before_it_is_copied() {
    let (pipeline, metrics) = pipeline(2);
    let first = pipeline.reserve().expect("a place");
    let _second = pipeline.reserve().expect("a place");
    // Every place is held by a sample in flight: the third is refused before any tee, and counted.
    assert!(pipeline.reserve().is_none());
    assert_eq!(metrics.eval_dropped.get(), 1);
    // A sample given up (not submitted) gives its place back.
    drop(first);
    assert!(pipeline.reserve().is_some());
    assert_eq!(metrics.eval_dropped.get(), 1);
}

/// The scheduling policy of this process's thread named `name` (field 41 of /proc/self/task/TID/stat).
/// Linux keeps the first 15 bytes of a thread's name.
fn policy_of(name: &str) -> Option<u32> {
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        // Fields from the third on: policy (41) is at index 38.
        return fields.get(38)?.parse().ok();
    }
    None
}

#[cfg(target_os = "linux")]
#[test]
fn the_evaluation_thread_gives_way_to_any_other_thread() {
    let (_pipeline, _metrics) = pipeline(4);
    // The thread lowers itself as it starts; every thread of this name (other tests' pipelines too)
    // is an evaluation thread.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = None;
    while Instant::now() < deadline {
        seen = policy_of("driftguard-eval");
        if seen == Some(libc::SCHED_IDLE as u32) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("the evaluation thread's scheduling policy is {seen:?}, not SCHED_IDLE");
}

/// Exchanges that exercise every path of the scoring: ASCII and non-ASCII words, digits, stopwords,
/// repeats, stemming, a gold anchor, an empty chunk, and a question with no content tokens.
fn pinned_exchanges() -> Vec<crate::signals::extract::Extracted> {
    use crate::signals::extract::Extracted;
    let piece = |s: &str| Some(s.to_string());
    vec![
        Extracted {
            question: piece("How do I roll back the canary when the index alias points at the wrong version?"),
            chunks: vec![
                "Rolling back a canary release starts with setting its traffic weight to zero; \
                 the router swaps its routing table atomically."
                    .into(),
                "The index alias is a pointer from a stable name, such as docs_current, to one \
                 physical index version. Flip the alias back to the last known good version."
                    .into(),
                "Version pins: BUILD_ID, GIT_SHA, MODEL_VER, INDEX_HASH 4711 and 2024 releases.".into(),
            ],
            answer: piece(
                "Set the canary's weight to zero, then flip the index alias back to the last good \
                 INDEX_HASH and rotate the cache namespace; watch recovery.",
            ),
            ..Extracted::default()
        },
        Extracted {
            question: piece("Wie setze ich den Größenindex zurück? Ωμέγα straße naïve café"),
            chunks: vec![
                "Der Größenindex wird über die Straße zurückgesetzt: naïve Cafés, ΣΊΣΥΦΟΣ und Ωμέγα."
                    .into(),
                String::new(),
                "Nothing in common here, only words words words and 12345 numbers.".into(),
            ],
            answer: piece("Den Größenindex setzt man über die Straße zurück, wie im Café."),
            anchor: piece("Größenindex Straße zurücksetzen"),
            ..Extracted::default()
        },
        Extracted {
            question: piece("the of and"),
            chunks: vec!["Stations, creations and things: testing the runners quickly.".into()],
            answer: piece("Testing stations quickly: the runners' creations."),
            ..Extracted::default()
        },
    ]
}

/// The scores of known exchanges, bit for bit (computed once with the reference implementation):
/// any change to the word split, the features, the hash, the stemming or the order of the float
/// sums shows here. Retrieval coverage is compared within 1e-12: its sums ran over a `HashSet`, in
/// an order that changed between processes.
#[test]
fn scores_of_known_exchanges_are_pinned() {
    let evaluator =
        Evaluator::from_config(&SignalsConfig::default()).expect("the default evaluator");
    let df = Mutex::new(DocFrequency::default());
    let got: Vec<_> = pinned_exchanges()
        .iter()
        .map(|e| evaluator.score(e, &df).expect("hashed never fails"))
        .collect();
    assert_eq!(got.len(), PINNED.len());
    for (s, (qr, ra, max, coverage, retrieval)) in got.iter().zip(PINNED) {
        assert_eq!(s.delta_s_qr.to_bits(), qr, "{s:?}");
        assert_eq!(s.delta_s_ra.to_bits(), ra, "{s:?}");
        assert_eq!(s.delta_s.to_bits(), max, "{s:?}");
        assert_eq!(s.coverage.map(f64::to_bits), coverage, "{s:?}");
        match (s.retrieval_coverage, retrieval) {
            (Some(a), Some(b)) => assert!((a - b).abs() < 1e-12, "{s:?}"),
            (a, b) => assert_eq!(a, b, "{s:?}"),
        }
    }
}

/// The bits of (ΔS qr, ΔS ra, ΔS, coverage) and the retrieval coverage of each pinned exchange.
type Pinned = (u64, u64, u64, Option<u64>, Option<f64>);

const PINNED: [Pinned; 3] = [
    (
        0x3fc7_828d_dac7_2cfb,
        0x3fdb_6477_7b68_7de1,
        0x3fdb_6477_7b68_7de1,
        Some(0x3fe4_0000_0000_0000),
        Some(0.875),
    ),
    (
        0x3fc7_ea5c_e680_7bbf,
        0x3fe7_7af0_c239_24d3,
        0x3fe7_7af0_c239_24d3,
        Some(0x3fe0_0000_0000_0000),
        Some(0.5),
    ),
    (
        0x3fd1_4055_c179_5bf9,
        0x3fbe_0233_29cd_e4a7,
        0x3fd1_4055_c179_5bf9,
        Some(0x3ff0_0000_0000_0000),
        None,
    ),
];
