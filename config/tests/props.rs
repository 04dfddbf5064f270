//! Property tests of the config loader, the stable-toolchain twin of the `config_load` fuzz
//! target (fuzz/fuzz_targets/config_load.rs): on TOML built from real key paths with values of
//! any type, on `FERRY_*` overrides, and on arbitrary text, `load_str` never panics; an error
//! list is never empty and every error names its problem and its place; a loaded config
//! validates again.

use ferry_config::{ConfigErrors, UplinkKind, env_var_name, key_paths, load_str};
use proptest::prelude::*;

/// The names uplink keys are tried under: two uplinks, so that the keys of both types meet,
/// one with a name that variables write differently (`EDGE_1`).
const UPLINK_NAMES: &[&str] = &["kafka", "edge-1"];

/// The key paths that take one value (no `[]` list element, no free-form `.*` table), with
/// the `<name>` of an uplink replaced by each of [`UPLINK_NAMES`].
fn scalar_paths() -> Vec<String> {
    key_paths()
        .into_iter()
        .filter(|p| !p.contains("[]") && !p.ends_with(".*"))
        .flat_map(|p| match p.contains("<name>") {
            true => UPLINK_NAMES
                .iter()
                .map(|n| p.replace("<name>", n))
                .collect(),
            false => vec![p],
        })
        .collect()
}

/// The `type` of each uplink of [`UPLINK_NAMES`]: none (the uplink exists only if a key of it
/// is picked, and then lacks its type), a type, or an unknown one.
fn uplink_types() -> impl Strategy<Value = Vec<Option<&'static str>>> {
    let mut types = UplinkKind::TYPES.to_vec();
    types.push("eventhubs"); // no such type
    proptest::collection::vec(
        proptest::option::of(prop::sample::select(types)),
        UPLINK_NAMES.len(),
    )
}

/// A TOML value of any type, biased towards values ferry's keys take.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        (0u64..100_000).prop_map(|n| n.to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| format!("{f:?}")),
        prop::sample::select(vec![
            "127.0.0.1:0",
            "0.0.0.0:1883",
            "reject",
            "drop_oldest",
            "gzip",
            "none",
            "sensors/+/temp",
            "#",
            "a/{1}/b",
            "info",
            "json",
            "/tmp/x",
            "kafka",
            "mqtt",
            "kinesis",
            "pubsub",
            "mqtt://h:1883",
            "http://h:8085",
            "h:9092",
            "",
        ])
        .prop_map(|s| format!("{s:?}")),
        "[a-z0-9_.:/+#{}-]{0,12}".prop_map(|s| format!("{s:?}")),
        proptest::collection::vec(0u32..10, 0..3).prop_map(|v| format!("{v:?}")),
        Just("[\"#\"]".to_string()),
        Just("[\"a/+\", \"b/#\"]".to_string()),
        Just("[{ filter = \"#\", topic = \"t\" }]".to_string()),
        Just("{ a = 1 }".to_string()),
    ]
}

fn check(result: Result<ferry_config::Config, ConfigErrors>) -> Result<(), TestCaseError> {
    match result {
        Ok(config) => prop_assert!(
            config.validate().is_ok(),
            "a loaded config fails validate()"
        ),
        Err(errors) => {
            prop_assert!(!errors.0.is_empty(), "an empty error list");
            for e in &errors.0 {
                prop_assert!(!e.message.is_empty(), "an error without a message: {e:?}");
                // An error without a place is the deserialization backstop: the key and type
                // checks missed something.
                prop_assert!(!e.path.is_empty(), "an error without a path: {e:?}");
            }
        }
    }
    Ok(())
}

/// `n` cases, or `PROPTEST_CASES` when set (for long runs, see bench/fuzz.sh).
fn cases(n: u32) -> ProptestConfig {
    let n = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(n);
    ProptestConfig::with_cases(n)
}

proptest! {
    #![proptest_config(cases(300))]

    #[test]
    fn known_keys_with_any_values(
        picks in proptest::collection::vec((any::<prop::sample::Index>(), value()), 0..6),
        env in proptest::collection::vec((any::<prop::sample::Index>(), value()), 0..3),
        types in uplink_types(),
    ) {
        let paths = scalar_paths();
        let mut toml = String::new();
        let mut used = std::collections::HashSet::new();
        for (name, t) in UPLINK_NAMES.iter().zip(types) {
            if let Some(t) = t {
                let p = format!("uplinks.{name}.type");
                toml.push_str(&format!("{p} = {t:?}\n"));
                used.insert(p);
            }
        }
        for (at, v) in picks {
            let p = at.get::<String>(&paths);
            if used.insert(p.clone()) {
                toml.push_str(&format!("{p} = {v}\n"));
            }
        }
        let env: Vec<(String, String)> = env
            .into_iter()
            .map(|(at, v)| {
                // An uplink's name is written upper-cased with `-` as `_`.
                let name = env_var_name(&at.get::<String>(&paths).replace('-', "_"));
                (name, v.trim_matches('"').to_string())
            })
            .collect();
        check(load_str(&toml, env))?;
    }

    #[test]
    fn arbitrary_text(toml in "(\\PC|\n|\\[|\\]|=|\"|\\.){0,80}", name in "[A-Z_]{0,12}", v in "\\PC{0,8}") {
        check(load_str(&toml, [(format!("FERRY_{name}"), v)]))?;
    }
}
