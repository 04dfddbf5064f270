//! The `ferry` binary. Everything lives in the library (`ferry_gateway::entry`), so the e2e
//! tests can build the very same entry point.

fn main() -> std::process::ExitCode {
    ferry_gateway::entry::main()
}
