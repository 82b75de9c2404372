//! The `efscache` command: parse arguments, call the library.

use clap::Parser;

fn main() {
    let cli = efscache::cli::Cli::parse();
    match efscache::main_with(cli) {
        Ok(code) => std::process::exit(code),
        Err(msg) => {
            eprintln!("efscache: {msg}");
            std::process::exit(1);
        }
    }
}
