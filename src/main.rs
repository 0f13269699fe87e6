//! The `ehrgate` command: a thin shell over the library.
#![forbid(unsafe_code)]

use clap::Parser;

// mimalloc: the proxy allocates and frees small buffers on every request, where it is
// measurably cheaper than the system allocator (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    ehrgate::cli::main(ehrgate::cli::Cli::parse())
}
