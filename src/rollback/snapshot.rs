//! Rollback snapshots (SPEC §6): what the engine saw when it tripped, recovered or escalated, written
//! durably under `state_dir/snapshots/` for the hooks and `GET /snapshots`, which admin serves from here.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::clock::now_ms;
use crate::config::Config;
use crate::rollback::state::{RuntimeState, Trip};
use crate::rules::Summary;
use crate::serve::router::RoutingTable;

/// The snapshot of SPEC §6: time, rule (and the probe it judges), observed value and threshold, every arm's pins and window,
/// the config hash, and the last ΔS and coverage samples.
pub fn snapshot_json(
    event: &str,
    trip: &Trip,
    state: &RuntimeState,
    config: &Config,
    table: &RoutingTable,
    config_hash: &str,
) -> serde_json::Value {
    let now = Instant::now();
    let arms: Vec<serde_json::Value> = table
        .arms()
        .iter()
        .zip(table.weights())
        .map(|(arm, weight)| {
            let window = Summary::from_window(&arm.stats.window.stats(now, config.rules.window.0));
            let recent = arm.stats.recent();
            serde_json::json!({
                "name": arm.name,
                "weight": weight,
                "baseline": arm.baseline,
                "pins": arm.pins.map(),
                "cache_ns": arm.cache_ns,
                "window": window.to_json(),
                "last_delta_s": recent.iter().map(|r| r.0).collect::<Vec<_>>(),
                "last_coverage": recent.iter().map(|r| r.1).collect::<Vec<_>>(),
            })
        })
        .collect();
    serde_json::json!({
        "event": event,
        "time_ms": now_ms(),
        "rule": trip.rule,
        "probe": trip.probe,
        "arm": trip.arm,
        "observed": trip.observed,
        "threshold": trip.threshold,
        "baseline_value": trip.baseline_value,
        "p_value": trip.p_value,
        "window_seconds": trip.window_seconds,
        "reason": trip.reason,
        "lever": trip.lever,
        "state": state.guard.state.as_str(),
        "config_hash": config_hash,
        "frozen": state.frozen,
        "arms": arms,
    })
}

pub fn snapshot_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("snapshots")
}

/// Writes a snapshot durably as `state_dir/snapshots/<id>.json`; returns its id.
pub fn write_snapshot(
    state_dir: &Path,
    event: &str,
    rule: &str,
    at_ms: u64,
    snapshot: &serde_json::Value,
) -> std::io::Result<String> {
    use std::io::Write;
    let dir = snapshot_dir(state_dir);
    std::fs::create_dir_all(&dir)?;
    let safe_rule: String = rule
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    let id = format!("{at_ms}-{event}-{safe_rule}");
    let mut doc = snapshot.clone();
    doc["id"] = id.as_str().into();
    let tmp = dir.join(format!("{id}.json.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(&doc).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(format!("{id}.json")))?;
    Ok(id)
}

/// Snapshot ids, newest first (`GET /snapshots`).
pub fn list_snapshots(state_dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(snapshot_dir(state_dir)) else {
        return Vec::new();
    };
    let mut ids: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".json"))
                .map(String::from)
        })
        .collect();
    ids.sort_by(|a, b| b.cmp(a));
    ids
}

/// One snapshot's JSON text (`GET /snapshots/<id>`); ids are checked so no path escapes the folder.
pub fn read_snapshot(state_dir: &Path, id: &str) -> Option<String> {
    if id.is_empty()
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return None;
    }
    std::fs::read_to_string(snapshot_dir(state_dir).join(format!("{id}.json"))).ok()
}
