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
