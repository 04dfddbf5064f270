//! The config loader (`ferry_config::load_str`) on arbitrary text and `FERRY_*` overrides.
//!
//! Input: TOML text, optionally followed by a NUL byte and `KEY=VALUE` lines, each becoming
//! the override `FERRY_KEY=VALUE` (so plain TOML files are valid seeds).
//!
//! Properties: never panics; an error list is never empty and every error prints; a config
//! that loads also passes `validate()` (which `load_str` already ran) when asked again.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (toml, env) = text.split_once('\0').unwrap_or((text, ""));
    let env: Vec<(String, String)> = env
        .lines()
        .take(8)
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap_or((l, ""));
            (format!("FERRY_{k}"), v.to_string())
        })
        .collect();
    match ferry_config::load_str(toml, env) {
        Ok(config) => config
            .validate()
            .expect("a config that loads must validate"),
        Err(errors) => {
            assert!(!errors.0.is_empty(), "an error list is never empty");
            for e in &errors.0 {
                assert!(!e.to_string().is_empty());
            }
        }
    }
});
