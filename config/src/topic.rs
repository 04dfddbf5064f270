//! MQTT topic rules, written once for all of ferry: what a topic name is, what a topic filter
//! is, how a filter matches a name, and the rewrite templates built on what a filter matched.
//!
//! Every place that takes or forwards a topic uses these: the MQTT and HTTP listeners (a
//! reading's topic), config validation (an uplink's `topics`, Kafka routes, MQTT rewrites),
//! the uplinks (which readings they take, where each goes), and the CLI.
//!
//! - A **name** is 1 to 65,535 bytes of UTF-8 without `+`, `#` or NUL.
//! - A **filter** is 1 to 65,535 bytes without NUL, where `+` and `#` each stand alone in a
//!   level and `#` is only the last level.
//! - **Matching**: `+` matches exactly one level (an empty one too), `#` matches the parent
//!   level and everything below it. A wildcard in the first level does not match a name
//!   starting with `$` (MQTT 3.1.1 §4.7.2, 5.0 §4.7.2).
//! - A **template** (`site-7/{1}/{#}`) is expanded from what a filter matched: `{N}` is what
//!   the N-th (1-based) `+` matched, `{#}` what the `#` matched; any other `{…}` stays as
//!   written.

/// The most bytes a topic name or filter may hold (an MQTT UTF-8 string's length field).
pub const MAX_LEN: usize = 65_535;

/// Checks a topic name: not empty, no `+` or `#` wildcard, no NUL, at most [`MAX_LEN`] bytes.
pub fn check_name(topic: &str) -> Result<(), String> {
    if topic.is_empty() {
        return Err("the topic is empty".into());
    }
    if let Some(w) = topic.chars().find(|c| matches!(c, '+' | '#')) {
        return Err(format!(
            "the topic '{topic}' contains the MQTT wildcard '{w}', which a topic name may not hold"
        ));
    }
    if topic.contains('\0') {
        return Err("the topic contains a NUL character".into());
    }
    if topic.len() > MAX_LEN {
        return Err(format!(
            "the topic is {} bytes long, more than {MAX_LEN}",
            topic.len()
        ));
    }
    Ok(())
}

/// The topic name in `bytes` as a `str`, if it is UTF-8 and passes [`check_name`].
pub fn name_from_bytes(bytes: &[u8]) -> Option<&str> {
    let t = std::str::from_utf8(bytes).ok()?;
    check_name(t).is_ok().then_some(t)
}

/// Checks a topic filter (see the module doc). Returns the number of `+` wildcards, which a
/// rewrite template may refer to.
pub fn check_filter(filter: &str) -> Result<usize, String> {
    if filter.is_empty() {
        return Err("must not be empty".into());
    }
    if filter.len() > MAX_LEN {
        return Err(format!("must be at most {MAX_LEN} bytes long"));
    }
    if filter.contains('\0') {
        return Err("must not contain NUL".into());
    }
    let levels: Vec<&str> = filter.split('/').collect();
    let mut plus = 0;
    for (i, level) in levels.iter().enumerate() {
        if level.contains('+') {
            if *level != "+" {
                return Err(format!(
                    "'+' must stand alone in a level (level {i} is '{level}')"
                ));
            }
            plus += 1;
        }
        if level.contains('#') {
            if *level != "#" {
                return Err(format!(
                    "'#' must stand alone in a level (level {i} is '{level}')"
                ));
            }
            if i + 1 != levels.len() {
                return Err("'#' must be the last level".into());
            }
        }
    }
    Ok(plus)
}

/// Whether the filter `filter` (valid by [`check_filter`]) matches the name `topic`.
pub fn matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    let mut first = true;
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return !(first && topic.starts_with('$')),
            (Some("+"), Some(level)) => {
                if first && level.starts_with('$') {
                    return false;
                }
            }
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
        first = false;
    }
}

/// What a filter's wildcards matched in a name.
#[derive(Debug, PartialEq, Eq)]
pub struct Captures<'a> {
    /// What each `+` matched, in order.
    pub plus: Vec<&'a str>,
    /// What the `#` matched (`""` when it matched only the parent level), if the filter has one.
    pub hash: Option<&'a str>,
}

/// Matches `topic` against `filter`, returning what each wildcard matched.
pub fn captures<'a>(filter: &str, topic: &'a str) -> Option<Captures<'a>> {
    if !matches(filter, topic) {
        return None;
    }
    let mut plus = Vec::new();
    let mut hash = None;
    let mut rest = topic;
    let mut levels = filter.split('/').peekable();
    while let Some(f) = levels.next() {
        if f == "#" {
            hash = Some(rest);
            break;
        }
        let (level, after) = rest.split_once('/').unwrap_or((rest, ""));
        if f == "+" {
            plus.push(level);
        }
        rest = after;
        // "a/#" also matches "a": '#' then captures nothing.
        if rest.is_empty() && levels.peek() == Some(&"#") {
            hash = Some("");
            break;
        }
    }
    Some(Captures { plus, hash })
}

/// Checks a part of a topic name, such as an uplink's `topic_prefix`: no `+`, `#` or NUL (it
/// may be empty).
pub fn check_part(part: &str) -> Result<(), String> {
    if part.contains(['+', '#', '\0']) {
        return Err("must not contain '+', '#' or NUL".into());
    }
    Ok(())
}

/// Checks a rewrite template: not empty, no NUL, no `+`, and `#` only as the placeholder
/// `{#}`, placeholders 1-based. What they refer to is checked against the filter by
/// [`check_rewrite`].
pub fn check_template(template: &str) -> Result<(), String> {
    if template.is_empty() {
        return Err("is required".into());
    }
    if template.replace("{#}", "").contains(['+', '#', '\0']) {
        return Err("must not contain '+', NUL, or '#' other than the placeholder {#}".into());
    }
    if template_placeholders(template).contains(&0) {
        return Err("placeholders are 1-based: use {1} for the first '+'".into());
    }
    Ok(())
}

/// Checks a rewrite: `template` ([`check_template`]) may refer only to wildcards `filter` has:
/// `{N}` to one of its `+` (1-based), `{#}` to its trailing `#`.
pub fn check_rewrite(filter: &str, template: &str) -> Result<(), String> {
    let plus = check_filter(filter)?;
    check_template(template)?;
    for n in template_placeholders(template) {
        if n > plus {
            return Err(format!(
                "{{{n}}} refers to wildcard {n}, but the filter has {plus} '+'"
            ));
        }
    }
    if template.contains("{#}") && !(filter == "#" || filter.ends_with("/#")) {
        return Err("{#} refers to the filter's trailing '#', which it does not have".into());
    }
    Ok(())
}

/// The `{N}` placeholders of a template, in order (validation checks each against its
/// filter's `+` count).
pub fn template_placeholders(template: &str) -> Vec<usize> {
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        let after = &rest[start + 1..];
        match after.find('}') {
            Some(end) if end > 0 && after[..end].bytes().all(|b| b.is_ascii_digit()) => {
                if let Ok(n) = after[..end].parse() {
                    out.push(n);
                }
                rest = &after[end + 1..];
            }
            _ => rest = after,
        }
    }
    out
}

/// Expands `template` with `caps`. A placeholder with no capture (validation refuses those)
/// expands to nothing.
pub fn expand(template: &str, caps: &Captures<'_>) -> String {
    let mut out = String::with_capacity(template.len() + 16);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            out.push_str(&rest[open..]);
            rest = "";
            break;
        };
        let name = &after[..close];
        if name == "#" {
            out.push_str(caps.hash.unwrap_or(""));
        } else if let Ok(n) = name.parse::<usize>() {
            if let Some(v) = n.checked_sub(1).and_then(|i| caps.plus.get(i)) {
                out.push_str(v);
            }
        } else {
            // Not a placeholder: keep it literally.
            out.push('{');
            out.push_str(name);
            out.push('}');
        }
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(check_name("a/b"), Ok(()));
        assert_eq!(check_name("/"), Ok(()));
        assert_eq!(check_name("$SYS/x"), Ok(()));
        for bad in ["", "a/+", "#", "a\0b"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_name(&"x".repeat(MAX_LEN)).is_ok());
        assert!(check_name(&"x".repeat(MAX_LEN + 1)).is_err());
        assert_eq!(name_from_bytes(b"a/b"), Some("a/b"));
        assert_eq!(name_from_bytes(&[0xff, 0xfe]), None);
        assert_eq!(name_from_bytes(b"a/#"), None);
    }

    #[test]
    fn filters() {
        assert_eq!(check_filter("a/b"), Ok(0));
        assert_eq!(check_filter("+/b/+"), Ok(2));
        assert_eq!(check_filter("#"), Ok(0));
        assert_eq!(check_filter("a/+/#"), Ok(1));
        assert_eq!(check_filter("/"), Ok(0));
        for bad in ["", "a/b+", "a#", "#/a", "a/#/b", "a/++", "a\0"] {
            assert!(check_filter(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn matching() {
        let cases = [
            ("sensors/+/temp", "sensors/a/temp", true),
            ("sensors/+/temp", "sensors/a/b/temp", false),
            ("sensors/+/temp", "sensors/a/hum", false),
            ("sensors/#", "sensors", true),
            ("sensors/#", "sensors/a/b", true),
            ("sensors/#", "sensorsx/a", false),
            ("#", "anything/at/all", true),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/x", false),
            ("$SYS/#", "$SYS/x", true),
            ("a/b", "a/b", true),
            ("a/b", "a/b/", false),
            ("a/+", "a/", true),
            ("+", "a", true),
            ("+", "a/b", false),
            ("a/b/c", "a/b", false),
            ("+/+", "/finance", true),
            ("/+", "/finance", true),
            ("+", "/finance", false),
        ];
        for (f, t, want) in cases {
            assert_eq!(matches(f, t), want, "{f} vs {t}");
        }
    }

    #[test]
    fn captures_plus_and_hash() {
        let c = |plus: Vec<&'static str>, hash| Some(Captures { plus, hash });
        assert_eq!(
            captures("sensors/+/+", "sensors/a/temp"),
            c(vec!["a", "temp"], None)
        );
        assert_eq!(
            captures("sensors/+/#", "sensors/a/b/c"),
            c(vec!["a"], Some("b/c"))
        );
        assert_eq!(captures("sensors/#", "sensors"), c(vec![], Some("")));
        assert_eq!(captures("+/x", "/x"), c(vec![""], None));
        assert_eq!(captures("sensors/+/temp", "sensors/a/hum"), None);
        assert_eq!(captures("+/x", "$SYS/x"), None);
    }

    #[test]
    fn templates() {
        assert_eq!(check_rewrite("logs/#", "archive/{#}"), Ok(()));
        assert_eq!(check_rewrite("s/+/+", "x/{2}/{1}"), Ok(()));
        assert_eq!(check_rewrite("#", "all/{#}"), Ok(()));
        for (filter, template) in [
            ("s/+", "x/{2}"),
            ("s/+", "x/{0}"),
            ("s/+", "x/{#}"),
            ("s/#", "x/#"),
            ("s/#", "x/+"),
            ("s/#", ""),
            ("s/+/", "a\0b"),
            ("s/#/x", "a"),
        ] {
            assert!(
                check_rewrite(filter, template).is_err(),
                "{filter} -> {template}"
            );
        }
        assert!(check_part("gw/").is_ok() && check_part("").is_ok());
        assert!(check_part("gw/#").is_err());
        assert_eq!(template_placeholders("a/{1}/{12}/{x}/{"), [1, 12]);
        let caps = Captures {
            plus: vec!["a"],
            hash: None,
        };
        assert_eq!(expand("x/{1}/{2}", &caps), "x/a/");
        assert_eq!(expand("x/{name}/{1", &caps), "x/{name}/{1");
        assert_eq!(expand("{0}{1}{1}", &caps), "aa");
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        /// A topic name: 1 to 5 levels of a small alphabet (so that levels collide), empty
        /// levels and a leading `$` included.
        fn name() -> impl Strategy<Value = Vec<String>> {
            proptest::collection::vec("(\\$?[ab]{0,2})", 1..6)
        }

        proptest! {
            /// A filter made from a name by turning levels into `+` and cutting the tail into
            /// `#` matches it (unless a first-level wildcard meets `$`), and the template made
            /// the same way gives the name back.
            #[test]
            fn derived_filters_match_and_capture(
                levels in name(),
                plus in proptest::collection::vec(any::<bool>(), 6),
                cut in proptest::option::of(0usize..6),
            ) {
                let topic = levels.join("/");
                prop_assume!(!topic.is_empty());
                prop_assert!(check_name(&topic).is_ok());
                let cut = cut.filter(|c| *c < levels.len());
                let mut filter = Vec::new();
                let mut template = Vec::new();
                let mut n = 0;
                for (i, level) in levels.iter().enumerate() {
                    if cut == Some(i) {
                        filter.push("#".to_string());
                        template.push("{#}".to_string());
                        break;
                    }
                    if plus[i] {
                        n += 1;
                        filter.push("+".to_string());
                        template.push(format!("{{{n}}}"));
                    } else {
                        filter.push(level.clone());
                        template.push(level.clone());
                    }
                }
                let filter = filter.join("/");
                prop_assert_eq!(check_filter(&filter), Ok(n));
                let wild_first = cut == Some(0) || plus[0];
                let want = !(wild_first && topic.starts_with('$'));
                prop_assert_eq!(matches(&filter, &topic), want, "{} vs {}", filter, topic);
                if want {
                    let caps = captures(&filter, &topic).expect("matches, so captures");
                    prop_assert_eq!(expand(&template.join("/"), &caps), topic);
                }
            }

            /// A literal level that differs from the name's never matches.
            #[test]
            fn a_different_level_never_matches(levels in name(), at in 0usize..6) {
                let topic = levels.join("/");
                let at = at % levels.len();
                let mut other = levels.clone();
                other[at].push('x');
                prop_assert!(!matches(&other.join("/"), &topic));
            }

            /// Names and filters of any text: the checks never panic, a name is a valid filter,
            /// and a text with a wildcard is never a name.
            #[test]
            fn any_text(t in "(\\PC|/|\\+|#|\\$){0,12}", u in "(\\PC|/|\\+|#){0,12}") {
                let name = check_name(&t).is_ok();
                prop_assert_eq!(name, !t.is_empty() && !t.contains(['+', '#', '\0']));
                if name {
                    prop_assert!(check_filter(&t).is_ok());
                }
                if check_filter(&u).is_ok() && name {
                    let _ = captures(&u, &t);
                }
            }
        }
    }
}
