//! The rollback plan's actions on the runtime state (SPEC §6 steps 2–5): freeze writes, pull the lever
//! the rule calls for, rotate the cache namespace, throttle. The engine runs them inside one
//! `Control::update_state`, so they reach the request path as one routing-table swap.

use std::collections::BTreeMap;

use crate::config::{self, Lever, RollbackStep};
use crate::rollback::state::RuntimeState;
use crate::serve::router::RoutingTable;

/// Pins the `alias` lever puts back.
const ALIAS_PINS: [&str; 2] = ["INDEX_ALIAS", "INDEX_HASH"];

/// Applies the configured steps 2–5 (freeze, lever, cache namespace, throttle) to the state; returns
/// what the lever did, in words (`"none"` when the lever step is off).
pub fn apply_steps(
    steps: &[RollbackStep],
    lever: Lever,
    s: &mut RuntimeState,
    config: &config::Config,
    table: &RoutingTable,
    arm: &str,
) -> String {
    let mut action = String::from("none");
    if steps.contains(&RollbackStep::FreezeWrites) {
        s.frozen = true;
    }
    if steps.contains(&RollbackStep::Lever) {
        action = pull_lever(lever, s, config, table, arm);
    }
    if steps.contains(&RollbackStep::RotateCache) {
        s.cache_epoch += 1;
    }
    if steps.contains(&RollbackStep::Throttle) {
        throttle(s);
    }
    action
}

/// Turns the throttle on: the budget × `rollback.throttle_factor` and tightened breakers, both applied
/// by `Control` when it rebuilds the table from the state.
fn throttle(s: &mut RuntimeState) {
    s.throttled = true;
}

/// Applies a lever to the state; returns what it did, in words.
fn pull_lever(
    lever: Lever,
    s: &mut RuntimeState,
    config: &config::Config,
    table: &RoutingTable,
    arm: &str,
) -> String {
    match lever {
        Lever::Route => {
            let Some(i) = table.index_of(arm) else {
                return format!("no arm {arm:?}");
            };
            let weight = table.weights()[i];
            let others: u64 = table
                .weights()
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, w)| u64::from(*w))
                .sum();
            if table.arms().len() == 1 {
                tracing::warn!(
                    arm,
                    "lever route: a single arm has nowhere to route to; left as is"
                );
                return "route: single arm, nothing to route to".into();
            }
            s.weights.insert(arm.to_string(), 0);
            let mut action = format!("arm {arm} weight {weight} → 0");
            if others == 0 {
                // Blue/green: the active arm goes back to the previous one, the baseline.
                let back = table
                    .baseline_index()
                    .filter(|b| *b != i)
                    .or_else(|| (0..table.arms().len()).find(|j| *j != i));
                if let Some(b) = back {
                    let name = table.arms()[b].name.clone();
                    action.push_str(&format!(", arm {name} weight 0 → {}", weight.max(1)));
                    s.weights.insert(name, weight.max(1));
                }
            }
            action
        }
        Lever::Alias => {
            let base = table
                .baseline_index()
                .map(|b| table.arms()[b].pins.map().clone());
            let mut put_back = BTreeMap::new();
            for pin in ALIAS_PINS {
                let value = config
                    .rollback
                    .alias
                    .get(pin)
                    .cloned()
                    .or_else(|| base.as_ref().and_then(|p| p.get(pin).cloned()));
                if let Some(v) = value {
                    put_back.insert(pin.to_string(), v);
                }
            }
            if put_back.is_empty() {
                tracing::warn!(arm, "lever alias: no last good INDEX_ALIAS / INDEX_HASH in [rollback.alias] or the baseline");
                return "alias: no last good values".into();
            }
            let action = format!("arm {arm} pins back to {put_back:?}");
            s.pin_overrides.insert(arm.to_string(), put_back);
            action
        }
        Lever::Flag => {
            let flag = &config.rollback.flag;
            if flag.is_empty() {
                tracing::warn!("lever flag: rollback.flag is not set");
                return "flag: rollback.flag not set".into();
            }
            s.flags.insert(flag.clone(), false);
            format!("flag {flag} off")
        }
        Lever::Degrade => {
            s.degrade = true;
            format!("degrade on ({})", config.rollback.degrade)
        }
        Lever::None => "none".into(),
    }
}

pub fn lever_name(lever: Lever) -> &'static str {
    match lever {
        Lever::Route => "route",
        Lever::Alias => "alias",
        Lever::Flag => "flag",
        Lever::Degrade => "degrade",
        Lever::None => "none",
    }
}
