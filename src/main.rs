//! The `tollgate` binary: parse config, start logging, run services. Everything else is in the
//! library crates.

// mimalloc: Pingora allocates per request; glibc malloc cost ~25 % of throughput here
// (docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    tollgate::cli::main()
}
