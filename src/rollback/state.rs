//! Runtime state: what operators (and, later, the rollback engine) changed while driftguard runs —
//! arm weights, the write freeze, degrade mode, flags — kept in `state_dir/runtime.json` so that a
//! restart, kill -9 included, comes back with the same routing instead of silently undoing a rollback.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

const FILE: &str = "runtime.json";

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RuntimeState {
    /// Weights set at run time, by arm; they win over the config file's.
    pub weights: BTreeMap<String, u32>,
    pub frozen: bool,
    pub degrade: bool,
    pub flags: BTreeMap<String, bool>,
    /// Pin values put back by the `alias` lever, by arm; they win over the config's and the env's.
    pub pin_overrides: BTreeMap<String, BTreeMap<String, String>>,
    /// Bumped by `rotate_cache`; mixed into every arm's cache namespace when above 0.
    pub cache_epoch: u64,
    /// The rollback throttle is on: budget × `rollback.throttle_factor`, breakers tightened.
    pub throttled: bool,
    /// The rollback engine's state machine.
    pub guard: GuardRecord,
}

/// Guard states of SPEC §6, with the `driftguard_guard_state` value of each.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuardState {
    #[default]
    Healthy,
    Tripped,
    Recovering,
    Escalated,
}

impl GuardState {
    pub const ALL: [GuardState; 4] = [
        GuardState::Healthy,
        GuardState::Tripped,
        GuardState::Recovering,
        GuardState::Escalated,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            GuardState::Healthy => "healthy",
            GuardState::Tripped => "tripped",
            GuardState::Recovering => "recovering",
            GuardState::Escalated => "escalated",
        }
    }

    /// The gauge value: 0 healthy, 1 tripped, 2 recovering, 3 escalated.
    pub fn gauge(self) -> i64 {
        self as i64
    }
}

/// What the rollback engine keeps across restarts. Times are Unix milliseconds, so timers such as the
/// recovery hold and deadline go on counting through a restart.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GuardRecord {
    pub state: GuardState,
    /// When the current state began.
    pub since_ms: u64,
    /// When the exit targets started holding without a break (recovering only).
    pub green_since_ms: Option<u64>,
    pub last_trip: Option<Trip>,
    /// The baseline captured for a single arm (`POST /baseline` or `rules.auto_baseline_after`).
    pub baseline: Option<PinnedBaseline>,
}

/// One trip: which rule, on which arm, what was seen and what was done.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Trip {
    pub rule: String,
    /// The ΔS probe the rule judges — `retrieval`, `answer` or `combined` — when it judges one.
    pub probe: Option<String>,
    pub arm: String,
    /// Observed value and threshold of the rule (`null` for a manual trip).
    pub observed: Option<f64>,
    pub threshold: Option<f64>,
    pub baseline_value: Option<f64>,
    pub p_value: Option<f64>,
    pub window_seconds: u64,
    pub at_ms: u64,
    pub lever: String,
    /// What the lever changed, in words (e.g. "arm canary weight 20 → 0").
    pub action: String,
    pub snapshot: Option<String>,
    pub reason: Option<String>,
    pub dry_run: bool,
}

/// A baseline pinned for a single-arm deployment: the window summary when it was captured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PinnedBaseline {
    pub arm: String,
    pub captured_ms: u64,
    pub pins: BTreeMap<String, String>,
    pub summary: crate::rules::Summary,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state_dir {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// The file the runtime state lives in.
#[derive(Debug)]
pub struct StateFile {
    dir: PathBuf,
    path: PathBuf,
}

impl StateFile {
    /// Opens (creating `state_dir` if needed) and reads the saved state. A file that cannot be parsed
    /// is moved aside as `runtime.json.corrupt` and the state starts empty, with an error logged.
    pub fn open(state_dir: &Path) -> Result<(StateFile, RuntimeState), StateError> {
        let io = |source| StateError::Io {
            path: state_dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(state_dir).map_err(io)?;
        let file = StateFile {
            dir: state_dir.to_path_buf(),
            path: state_dir.join(FILE),
        };
        let state = match std::fs::read(&file.path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(state) => state,
                Err(e) => {
                    let aside = state_dir.join(format!("{FILE}.corrupt"));
                    tracing::error!(file = %file.path.display(), error = %e, moved_to = %aside.display(),
                        "runtime state unreadable; starting from the config alone");
                    std::fs::rename(&file.path, &aside).map_err(io)?;
                    RuntimeState::default()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => RuntimeState::default(),
            Err(e) => return Err(io(e)),
        };
        Ok((file, state))
    }

    /// Writes the state durably: a temp file, fsync, rename over the old one, fsync the directory.
    pub fn save(&self, state: &RuntimeState) -> Result<(), StateError> {
        let io = |source| StateError::Io {
            path: self.path.display().to_string(),
            source,
        };
        let tmp = self.dir.join(format!("{FILE}.tmp"));
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| io(std::io::Error::other(e)))?;
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        if let Ok(dir) = std::fs::File::open(&self.dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("driftguard-state-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn saves_and_reads_back() {
        let dir = temp_dir("roundtrip");
        let (file, state) = StateFile::open(&dir).unwrap();
        assert_eq!(state, RuntimeState::default());
        let mut state = RuntimeState {
            frozen: true,
            degrade: true,
            ..Default::default()
        };
        state.weights.insert("canary".into(), 0);
        state.flags.insert("beta".into(), false);
        file.save(&state).unwrap();
        let (_, again) = StateFile::open(&dir).unwrap();
        assert_eq!(again, state);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_corrupt_file_is_moved_aside() {
        let dir = temp_dir("corrupt");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(FILE), b"{not json").unwrap();
        let (_, state) = StateFile::open(&dir).unwrap();
        assert_eq!(state, RuntimeState::default());
        assert!(dir.join(format!("{FILE}.corrupt")).exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
