//! Builds the wasm guests in `examples/` for `wasm32-wasip2` (and the preview 1 module from
//! its WAT source), so the binary can embed the hello app for `brink up` and the tests can
//! run every example. They are build outputs: nothing built here is committed.

use std::path::{Path, PathBuf};
use std::process::Command;

const GUESTS: [&str; 5] = ["hello", "echo", "job", "faulty", "fetch"];

fn main() {
    let root =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let examples = root.join("examples");
    for path in ["Cargo.toml", "Cargo.lock", "p1-hello"]
        .iter()
        .chain(GUESTS.iter())
    {
        println!("cargo:rerun-if-changed={}", examples.join(path).display());
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("examples");
    std::fs::create_dir_all(&out).expect("create the examples output directory");

    build_guests(&examples, &out);

    let wat = examples.join("p1-hello/hello.wat");
    let wasm = wat::parse_file(&wat).unwrap_or_else(|e| panic!("{}: {e}", wat.display()));
    std::fs::write(out.join("p1-hello.wasm"), wasm).expect("write p1-hello.wasm");

    println!("cargo:rustc-env=BRINK_EXAMPLES_DIR={}", out.display());
}

fn build_guests(examples: &Path, out: &Path) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target_dir = examples.join("target");
    let mut command = Command::new(cargo);
    command
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "wasm32-wasip2",
            "--manifest-path",
        ])
        .arg(examples.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    // The outer build's flags, wrappers (clippy) and target are not the guests' business.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CLIPPY_ARGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_PROFILE_RELEASE_DEBUG",
    ] {
        command.env_remove(var);
    }
    let status = command
        .status()
        .expect("run cargo to build the example guests");
    if !status.success() {
        panic!(
            "building the wasm guests in examples/ failed. If the wasm32-wasip2 target is missing, \
             run `rustup target add wasm32-wasip2` (scripts/test and scripts/up do this for you)."
        );
    }
    for guest in GUESTS {
        let built = target_dir
            .join("wasm32-wasip2/release")
            .join(format!("{guest}.wasm"));
        std::fs::copy(&built, out.join(format!("{guest}.wasm")))
            .unwrap_or_else(|e| panic!("copy {}: {e}", built.display()));
    }
}
