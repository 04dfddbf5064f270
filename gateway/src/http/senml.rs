//! SenML packs (RFC 8428, JSON representation) resolved into readings.
//!
//! **One reading per resolved record.** Each record of the pack is resolved as RFC 8428
//! section 4.6 describes, and becomes one reading:
//! - topic = the resolved name (base name + name), which must follow section 4.5.1 (it then
//!   never holds an MQTT wildcard);
//! - `received_at_ms` = the resolved time (base time + time; a value below 2^28 is relative to
//!   now, section 4.5.3); an absolute time is the device's own and goes upstream marked
//!   `ferry-clock: device` ([`ferry_buffer::clock`]);
//! - payload = a one-record SenML pack holding the resolved record (`n`, `t` absolute, `u`
//!   from the record or base unit, `v` + base value, `s` + base sum, `vs`, `vb`, `vd`, `ut`),
//!   with content type `application/senml+json`, so every downstream consumer can still read
//!   it as SenML.
//!
//! Why per record and not per pack: the uplinks route and key by topic and by time, and a
//! pack often mixes measurements (voltage, current, ...) that consumers want apart. The pack
//! is still committed atomically: all its records or none.
//!
//! Rejected, with the index of the offending record: a record that is not an object, a field
//! of the wrong type, a resolved name that breaks section 4.5.1, a base name that could never
//! start a valid one (not empty, and breaking section 4.5.1: checked where it is set), more
//! than one value field, a record with a name but no value or sum, an unknown field ending in
//! `_` (must-understand, section 4.4), `bver` above 10, a non-finite or pre-1970 time. A
//! record holding only base fields (`bn`, `bt`, ...) sets them for the records after it and
//! yields no reading. Other unknown fields are ignored, as the RFC allows.

use super::formats::{Origin, SENML_JSON};
use super::problem::IngestError;
use ferry_buffer::{ClockMark, Reading, Source};
use serde_json::{Map, Value};

/// Times below this are relative to now (RFC 8428 section 4.5.3).
const RELATIVE_LIMIT: f64 = 268_435_456.0;
/// The newest SenML version this parser understands.
const VERSION: i64 = 10;

#[derive(Debug, Default)]
struct Base {
    name: String,
    time: f64,
    unit: Option<String>,
    value: Option<f64>,
    sum: Option<f64>,
}

fn err(i: usize, msg: impl std::fmt::Display) -> IngestError {
    IngestError::InvalidSenml(format!("SenML record {i}: {msg}"))
}

/// The range of `t` and `bt` (seconds): a relative time at most about 25 years back, an
/// absolute one at most 1e15 s. The OpenAPI document states the same bounds.
pub(crate) const TIME_RANGE: (f64, f64) = (-800_000_000.0, 1e15);

/// `t` or `bt`, within [`TIME_RANGE`].
fn time_field(i: usize, rec: &Map<String, Value>, key: &str) -> Result<Option<f64>, IngestError> {
    let t = num(i, rec, key)?;
    if let Some(v) = t
        && !(TIME_RANGE.0..=TIME_RANGE.1).contains(&v)
    {
        return Err(err(
            i,
            format!(
                "'{key}' {v} is out of range ({} to {} seconds)",
                TIME_RANGE.0, TIME_RANGE.1
            ),
        ));
    }
    Ok(t)
}

fn num(i: usize, rec: &Map<String, Value>, key: &str) -> Result<Option<f64>, IngestError> {
    match rec.get(key) {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_f64()
            .filter(|f| f.is_finite())
            .map(Some)
            .ok_or_else(|| err(i, format!("'{key}' is not a finite number"))),
        Some(other) => Err(err(i, format!("'{key}' must be a number, got {other}"))),
    }
}

fn string<'a>(
    i: usize,
    rec: &'a Map<String, Value>,
    key: &str,
) -> Result<Option<&'a str>, IngestError> {
    match rec.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(err(i, format!("'{key}' must be a string, got {other}"))),
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | ':' | '.' | '/' | '_'))
}

/// Resolves a SenML pack into one reading per record.
pub fn parse_senml(body: &[u8], origin: &Origin, max: usize) -> Result<Vec<Reading>, IngestError> {
    let records: Vec<Value> = serde_json::from_slice(body).map_err(|e| {
        IngestError::MalformedJson(format!(
            "the SenML pack is not a JSON array at line {}, column {}: {}",
            e.line(),
            e.column(),
            super::formats::serde_message(&e)
        ))
    })?;
    let device = origin.device(None)?;
    let now_s = origin.now_ms as f64 / 1000.0;
    let mut base = Base::default();
    let mut out = Vec::with_capacity(records.len().min(max));
    for (i, rec) in records.iter().enumerate() {
        let Value::Object(rec) = rec else {
            return Err(err(i, "a record must be a JSON object"));
        };
        if let Some(k) = rec.keys().find(|k| k.ends_with('_')) {
            return Err(err(
                i,
                format!(
                    "the field '{k}' must be understood (it ends in '_') and ferry does not know it"
                ),
            ));
        }
        // Base fields apply to this record and the ones after it.
        match rec.get("bver") {
            None => {}
            Some(Value::Number(n)) => match n.as_i64() {
                Some(v) if (1..=VERSION).contains(&v) => {}
                _ => {
                    return Err(err(
                        i,
                        format!("'bver' {n} is not a version up to {VERSION}"),
                    ));
                }
            },
            Some(other) => return Err(err(i, format!("'bver' must be a number, got {other}"))),
        }
        if let Some(bn) = string(i, rec, "bn")? {
            // Checked where it is set: a base name that breaks section 4.5.1 can never start a
            // valid name (empty is allowed: it clears the base name).
            if !bn.is_empty() && !valid_name(bn) {
                return Err(err(
                    i,
                    format!(
                        "the base name '{bn}' is invalid: it must start with a letter or digit and hold only letters, digits and - : . / _ (RFC 8428 section 4.5.1)"
                    ),
                ));
            }
            base.name = bn.to_string();
        }
        if let Some(bt) = time_field(i, rec, "bt")? {
            base.time = bt;
        }
        if let Some(bu) = string(i, rec, "bu")? {
            base.unit = Some(bu.to_string());
        }
        if let Some(bv) = num(i, rec, "bv")? {
            base.value = Some(bv);
        }
        if let Some(bs) = num(i, rec, "bs")? {
            base.sum = Some(bs);
        }
        let only_base = rec.keys().all(|k| k.starts_with('b'));
        if only_base {
            continue;
        }

        let name = format!("{}{}", base.name, string(i, rec, "n")?.unwrap_or(""));
        if !valid_name(&name) {
            return Err(err(
                i,
                format!(
                    "the resolved name '{name}' is invalid: it must start with a letter or digit and hold only letters, digits and - : . / _ (RFC 8428 section 4.5.1)"
                ),
            ));
        }
        let v = num(i, rec, "v")?;
        let vs = string(i, rec, "vs")?;
        let vb = match rec.get("vb") {
            None => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(other) => return Err(err(i, format!("'vb' must be true or false, got {other}"))),
        };
        let vd = string(i, rec, "vd")?;
        let s = num(i, rec, "s")?;
        let values = [v.is_some(), vs.is_some(), vb.is_some(), vd.is_some()]
            .iter()
            .filter(|x| **x)
            .count();
        if values > 1 {
            return Err(err(
                i,
                "a record may hold only one of 'v', 'vs', 'vb' and 'vd'",
            ));
        }
        if values == 0 && s.is_none() {
            return Err(err(
                i,
                format!("'{name}' has no value ('v', 'vs', 'vb', 'vd') and no sum ('s')"),
            ));
        }
        let t = time_field(i, rec, "t")?.unwrap_or(0.0);
        let mut time = base.time + t;
        // A relative time is ferry's clock; an absolute one is the device's own.
        let device_time = time >= RELATIVE_LIMIT;
        if !device_time {
            time += now_s;
        }
        if !time.is_finite() || time < 0.0 {
            return Err(err(i, format!("the resolved time {time} is before 1970")));
        }
        let ut = num(i, rec, "ut")?;

        let mut resolved = Map::new();
        resolved.insert("n".into(), Value::from(name.clone()));
        if let Some(u) = string(i, rec, "u")?
            .map(str::to_string)
            .or_else(|| base.unit.clone())
        {
            resolved.insert("u".into(), Value::from(u));
        }
        if let Some(v) = v {
            resolved.insert("v".into(), Value::from(v + base.value.unwrap_or(0.0)));
        }
        if let Some(vs) = vs {
            resolved.insert("vs".into(), Value::from(vs));
        }
        if let Some(vb) = vb {
            resolved.insert("vb".into(), Value::from(vb));
        }
        if let Some(vd) = vd {
            resolved.insert("vd".into(), Value::from(vd));
        }
        if let Some(s) = s {
            resolved.insert("s".into(), Value::from(s + base.sum.unwrap_or(0.0)));
        }
        resolved.insert("t".into(), Value::from(time));
        if let Some(ut) = ut {
            resolved.insert("ut".into(), Value::from(ut));
        }
        if out.len() == max {
            return Err(IngestError::TooManyReadings {
                count: records.len(),
                limit: max,
            });
        }
        let payload =
            serde_json::to_vec(&Value::Array(vec![Value::Object(resolved)])).unwrap_or_default();
        let mut r =
            Reading::new(Source::Http, device.clone(), name, payload).with_content_type(SENML_JSON);
        r.received_at_ms = (time * 1000.0).round() as u64;
        if device_time {
            r.clock.mark = ClockMark::Device;
        }
        out.push(r);
    }
    Ok(out)
}
