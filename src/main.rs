//! The `efscache` command: parse arguments, call the library. Called as
//! `mount.efscache` / `umount.fuse.efscache` (symlinks `efscache install`
//! makes), it speaks the mount(8)/umount(8) helper protocol instead.

use clap::Parser;

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let argv0 = args.first().cloned().unwrap_or_default();
    let (name, result) = match efscache::cli::helper_for(&argv0) {
        Some(helper) => (
            std::path::Path::new(&argv0)
                .file_name()
                .map_or("efscache".into(), |n| n.to_string_lossy().into_owned()),
            efscache::helper_main(helper, &args[1..]),
        ),
        None => ("efscache".to_string(), efscache::main_with(efscache::cli::Cli::parse())),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(msg) => {
            eprintln!("{name}: {msg}");
            std::process::exit(1);
        }
    }
}
