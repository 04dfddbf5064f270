//! The `ferry` command, built inside this crate so that cargo builds it before the e2e tests
//! run (cargo builds a package's own binaries for its integration tests, not other
//! packages'). [`ferry_tests::bin_path`] resolves `"ferry"` to it.

fn main() -> std::process::ExitCode {
    ferry_gateway::entry::main()
}
