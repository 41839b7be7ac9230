//! `job`: a wasi:cli command for run-to-completion pods. Prints numbered lines to stdout and
//! exits with the code it is given:
//!
//!   job [--lines N] [--exit CODE] [--sleep-ms MS] [--stderr]
//!
//! `--sleep-ms` pauses between lines (so a test can watch a job while it runs); `--stderr`
//! writes every other line to stderr so log capture of both streams can be checked.

use std::io::Write as _;
use std::time::Duration;

fn main() {
    let mut lines: u64 = 3;
    let mut exit_code: u8 = 0;
    let mut sleep_ms: u64 = 0;
    let mut use_stderr = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = |args: &mut dyn Iterator<Item = String>| args.next().unwrap_or_default();
        match arg.as_str() {
            "--lines" => lines = value(&mut args).parse().unwrap_or(lines),
            "--exit" => exit_code = value(&mut args).parse().unwrap_or(exit_code),
            "--sleep-ms" => sleep_ms = value(&mut args).parse().unwrap_or(sleep_ms),
            "--stderr" => use_stderr = true,
            other => {
                eprintln!("job: unknown argument {other:?}");
                exit(2);
            }
        }
    }
    let name = std::env::var("POD_NAME").unwrap_or_else(|_| "job".into());
    for i in 1..=lines {
        if use_stderr && i % 2 == 0 {
            let _ = writeln!(std::io::stderr(), "{name} line {i}");
        } else {
            let _ = writeln!(std::io::stdout(), "{name} line {i}");
        }
        if sleep_ms > 0 {
            std::thread::sleep(Duration::from_millis(sleep_ms));
        }
    }
    exit(exit_code);
}

/// Exits with an exact status code. Rust's `std::process::exit` on wasip2 can only say
/// success or failure; `wasi:cli/exit.exit-with-code` carries the number.
fn exit(code: u8) -> ! {
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    if code == 0 {
        std::process::exit(0);
    }
    wasip2::cli::exit::exit_with_code(code);
    std::process::exit(1)
}
