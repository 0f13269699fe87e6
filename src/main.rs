//! The `ehrgate` command: a thin shell over the library.
#![forbid(unsafe_code)]

use clap::Parser;

fn main() -> std::process::ExitCode {
    ehrgate::cli::main(ehrgate::cli::Cli::parse())
}
