//! The `ferry` command, built inside this crate so that cargo builds it before the bench smoke
//! test runs (cargo builds a package's own binaries for its integration tests, not other
//! packages'). `bench-run` uses it unless `--ferry PATH` names another build.

fn main() -> std::process::ExitCode {
    ferry_gateway::entry::main()
}
