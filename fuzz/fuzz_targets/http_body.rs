//! The HTTP batch body parsers (JSON array, NDJSON, SenML) on arbitrary bodies.
//!
//! Input: one byte choosing the format, the limit and the token binding, then the body. The
//! properties are checked in `ferry_gateway::testkit::http_body`.

#![no_main]

use ferry_gateway::testkit::http_body;
use ferry_gateway::testkit::BatchFormat;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let format = match mode % 3 {
        0 => BatchFormat::JsonArray,
        1 => BatchFormat::Ndjson,
        _ => BatchFormat::Senml,
    };
    let max = [1, 3, 1000][usize::from(mode / 3 % 3)];
    let bound = (mode & 0x40 != 0).then_some("dev-1");
    let header = (mode & 0x80 != 0).then_some("dev-2");
    http_body(format, body, max, bound, header);
});
