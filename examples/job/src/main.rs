//! `job`: a wasi:cli command for run-to-completion pods. Prints numbered lines to stdout and
//! exits with the code it is given:
//!
//!   job [--lines N] [--exit CODE] [--sleep-ms MS] [--stderr]
//!       [--cat PATH]... [--write PATH TEXT]... [--wait-for PATH TEXT]...
//!       [--count PATH --until N]
//!
//! `--sleep-ms` pauses between lines (so a test can watch a job while it runs); `--stderr`
//! writes every other line to stderr so log capture of both streams can be checked.
//! The file actions run first, in order, on the directories the pod's volumes give it:
//! `--cat` prints `cat PATH: CONTENT`; `--write` writes TEXT to PATH; `--count` adds one
//! to the number in PATH, prints `count N`, and fails (exit 1) while N is below `--until`,
//! so a restarting job shows whether the file outlived the restart; `--wait-for` polls
//! PATH until it holds TEXT (at most 30 s) and prints `saw PATH: TEXT`. A file action that
//! fails prints `PATH: ERROR` to stderr and exits 4.

use std::io::Write as _;
use std::time::Duration;

fn main() {
    let mut lines: u64 = 3;
    let mut exit_code: u8 = 0;
    let mut sleep_ms: u64 = 0;
    let mut use_stderr = false;
    let mut count: Option<(String, u64)> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = |args: &mut dyn Iterator<Item = String>| args.next().unwrap_or_default();
        match arg.as_str() {
            "--lines" => lines = value(&mut args).parse().unwrap_or(lines),
            "--exit" => exit_code = value(&mut args).parse().unwrap_or(exit_code),
            "--sleep-ms" => sleep_ms = value(&mut args).parse().unwrap_or(sleep_ms),
            "--stderr" => use_stderr = true,
            "--cat" => {
                let path = value(&mut args);
                match std::fs::read_to_string(&path) {
                    Ok(text) => println!("cat {path}: {}", text.trim_end()),
                    Err(e) => fail(&path, e),
                }
            }
            "--write" => {
                let path = value(&mut args);
                let text = value(&mut args);
                if let Err(e) = std::fs::write(&path, text) {
                    fail(&path, e);
                }
            }
            "--wait-for" => {
                let path = value(&mut args);
                let text = value(&mut args);
                let deadline = std::time::Instant::now() + Duration::from_secs(30);
                loop {
                    let now = std::fs::read_to_string(&path).unwrap_or_default();
                    if now.trim_end() == text {
                        println!("saw {path}: {text}");
                        break;
                    }
                    if std::time::Instant::now() > deadline {
                        eprintln!("{path}: still {now:?} after 30 s");
                        exit(5);
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            "--count" => count = Some((value(&mut args), 1)),
            "--until" => {
                let until = value(&mut args).parse().unwrap_or(1);
                count = count.map(|(path, _)| (path, until));
            }
            other => {
                eprintln!("job: unknown argument {other:?}");
                exit(2);
            }
        }
    }
    if let Some((path, until)) = count {
        let before: u64 = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0);
        let now = before + 1;
        if let Err(e) = std::fs::write(&path, now.to_string()) {
            fail(&path, e);
        }
        println!("count {now}");
        if now < until {
            exit(1);
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

fn fail(path: &str, error: std::io::Error) -> ! {
    eprintln!("{path}: {error}");
    exit(4)
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
