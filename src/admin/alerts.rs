//! `POST /alerts`: Alertmanager's webhook (payload version 4) trips the guard — the fleet's, with
//! `[fleet]` — on a firing alert labelled `driftguard_action="trip"`, so alert rules over fleet-wide
//! Prometheus data can roll the whole service back. Called by the admin routes after the token check.
//! Resolved alerts never recover: the watch for green does.

use serde::Deserialize;

use crate::rollback::engine::{Engine, EngineError, TripRequest};

/// The label that asks for a trip, and its value.
pub const ACTION_LABEL: &str = "driftguard_action";
pub const TRIP: &str = "trip";

/// The parts of Alertmanager's webhook payload read here (its other fields are ignored).
#[derive(Debug, Deserialize)]
pub struct Payload {
    pub version: String,
    #[serde(default)]
    pub alerts: Vec<Alert>,
}

#[derive(Debug, Deserialize)]
pub struct Alert {
    pub status: String,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub fingerprint: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AlertsError {
    #[error("not an Alertmanager webhook payload: {0}")]
    Shape(serde_json::Error),
    #[error("Alertmanager webhook payload version {0:?}; version \"4\" is understood")]
    Version(String),
}

/// What the payload did: `(alertname, outcome)` per alert that asked for a trip.
pub fn handle(engine: &Engine, body: &[u8]) -> Result<serde_json::Value, AlertsError> {
    let payload: Payload = serde_json::from_slice(body).map_err(AlertsError::Shape)?;
    if payload.version != "4" {
        return Err(AlertsError::Version(payload.version));
    }
    let mut outcomes = Vec::new();
    for alert in &payload.alerts {
        if alert.labels.get(ACTION_LABEL).map(String::as_str) != Some(TRIP) {
            continue;
        }
        let name = alert
            .labels
            .get("alertname")
            .cloned()
            .unwrap_or_else(|| "alert".into());
        let outcome = if alert.status != "firing" {
            "ignored: resolved (recovery is the watch's)".to_string()
        } else {
            let request = TripRequest {
                rule: name.clone(),
                arm: alert.labels.get("arm").cloned(),
                finding: None,
                reason: Some(format!("alertmanager alert {name} ({})", alert.fingerprint)),
                window_seconds: engine.control().config().rules.window.0.as_secs(),
            };
            match engine.trip(request) {
                Ok(events) => {
                    for ctx in events {
                        engine.fire(ctx);
                    }
                    "tripped".to_string()
                }
                Err(EngineError::NotHealthy(state)) => format!("ignored: already {state}"),
                Err(e) => format!("refused: {e}"),
            }
        };
        tracing::warn!(
            alert = name.as_str(),
            outcome = outcome.as_str(),
            "alertmanager alert"
        );
        outcomes.push(serde_json::json!({"alertname": name, "outcome": outcome}));
    }
    Ok(serde_json::json!({"alerts": outcomes}))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example payload of Alertmanager's webhook documentation (version 4), with our labels.
    const PAYLOAD: &str = r#"{
      "version": "4",
      "groupKey": "{}:{alertname=\"DriftguardDeltaSDrift\"}",
      "truncatedAlerts": 0,
      "status": "firing",
      "receiver": "driftguard-trip",
      "groupLabels": {"alertname": "DriftguardDeltaSDrift"},
      "commonLabels": {"alertname": "DriftguardDeltaSDrift", "driftguard_action": "trip"},
      "commonAnnotations": {},
      "externalURL": "http://alertmanager:9093",
      "alerts": [
        {"status": "firing",
         "labels": {"alertname": "DriftguardDeltaSDrift", "arm": "canary", "driftguard_action": "trip"},
         "annotations": {"summary": "drift"},
         "startsAt": "2026-12-03T12:00:00Z", "endsAt": "0001-01-01T00:00:00Z",
         "generatorURL": "http://prometheus:9090/graph", "fingerprint": "c0ffee"},
        {"status": "firing", "labels": {"alertname": "Other"}, "annotations": {},
         "startsAt": "2026-12-03T12:00:00Z", "endsAt": "0001-01-01T00:00:00Z",
         "generatorURL": "", "fingerprint": "beef"}
      ]
    }"#;

    #[test]
    fn the_documented_payload_parses() {
        let p: Payload = serde_json::from_str(PAYLOAD).unwrap();
        assert_eq!(p.version, "4");
        assert_eq!(p.alerts.len(), 2);
        assert_eq!(p.alerts[0].labels[ACTION_LABEL], TRIP);
        assert_eq!(p.alerts[0].labels["arm"], "canary");
        assert!(!p.alerts[1].labels.contains_key(ACTION_LABEL));
    }
}
