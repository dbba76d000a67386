//! The README's configuration reference is the truth: every key in it parses, and every value it shows
//! is the default the code uses.

use driftguard::config::{Budget, Config};
use driftguard::rules::{lever_for, Rule};

fn reference() -> String {
    let readme = include_str!("../README.md");
    let start = readme
        .find("<!-- config-reference:")
        .expect("the config-reference marker in README.md");
    let block = &readme[start..];
    let open = block
        .find("```toml\n")
        .expect("a toml block after the marker")
        + 8;
    let close = block[open..].find("```").expect("the block's end") + open;
    block[open..close].to_string()
}

#[test]
fn readme_reference_parses_and_shows_the_defaults() {
    let text = reference();
    let parsed = Config::parse(&text).unwrap_or_else(|e| panic!("README reference: {e}"));
    let default = Config::default();
    macro_rules! same {
        ($($field:ident),+) => {$(
            assert_eq!(
                format!("{:?}", parsed.$field),
                format!("{:?}", default.$field),
                "README [{}] differs from the defaults", stringify!($field)
            );
        )+};
    }
    same!(
        state_dir,
        strict_pins,
        listen,
        runtime,
        admin,
        routing,
        upstream,
        cache,
        signals,
        breaker,
        writes,
        recovery,
        log
    );
    // Sections with maps whose absence means "built-in defaults": compare the scalar keys, and check
    // each listed map entry against the built-in value.
    let (r, d) = (&parsed.rules, &default.rules);
    assert_eq!(
        (
            r.window.0,
            r.eval_interval.0,
            r.min_samples,
            r.dry_run,
            r.latency_floor.0,
            r.auto_baseline_after.0
        ),
        (
            d.window.0,
            d.eval_interval.0,
            d.min_samples,
            d.dry_run,
            d.latency_floor.0,
            d.auto_baseline_after.0
        )
    );
    assert_eq!(r.confidence, d.confidence);
    assert_eq!(r.hard.len(), Rule::ALL.len(), "every hard rule is listed");
    for rule in Rule::ALL {
        assert_eq!(
            r.hard.get(rule.key()),
            Some(&rule.default_threshold()),
            "{}",
            rule.key()
        );
    }
    let (b, d) = (&parsed.rollback, &default.rollback);
    assert_eq!(
        format!(
            "{:?}",
            (
                &b.steps,
                b.lever,
                &b.flag,
                &b.degrade,
                b.throttle_factor,
                &b.alias,
                &b.hooks
            )
        ),
        format!(
            "{:?}",
            (
                &d.steps,
                d.lever,
                &d.flag,
                &d.degrade,
                d.throttle_factor,
                &d.alias,
                &d.hooks
            )
        )
    );
    assert_eq!(
        b.levers.len(),
        Rule::ALL.len(),
        "every rule's lever is listed"
    );
    for (rule, lever) in &b.levers {
        assert_eq!(*lever, lever_for(rule, d), "[rollback.levers] {rule}");
    }
    assert!(parsed.budget.is_none(), "no [budget] by default");
}

#[test]
fn readme_budget_defaults_are_the_code_defaults() {
    let text = reference();
    let start = text
        .find("# [budget]")
        .expect("the commented [budget] table");
    let table: String = text[start..]
        .lines()
        .take_while(|l| l.starts_with('#'))
        .map(|l| l.trim_start_matches('#').trim_start())
        .map(|l| format!("{l}\n"))
        .collect();
    let config = format!("[[arms]]\nname = \"a\"\nupstream = \"http://127.0.0.1:1\"\n{table}");
    let parsed = Config::parse(&config).unwrap_or_else(|e| panic!("README [budget]: {e}\n{table}"));
    assert_eq!(
        format!("{:?}", parsed.budget.expect("budget")),
        format!("{:?}", Budget::default())
    );
}
