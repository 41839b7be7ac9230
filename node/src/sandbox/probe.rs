//! Sandbox side of the attack probe: native code run inside exactly the jail a pod gets
//! (same set-up, same privileges, same seccomp filter), for the tests that attack the
//! sandbox (`brink sandbox-probe`). Never reachable from a pod: only the agent chooses a
//! sandbox's mode, and pods always get [`SandboxMode::Pod`](brink_proto::sandbox::SandboxMode).
//!
//! Each attack prints what happened as lines of output and then reports an exit; an attack
//! that seccomp forbids never reports: the process dies of SIGSYS, which the agent sees.

use std::ffi::CString;
use std::io;

use brink_proto::sandbox::{Exited, LogStream, Message};

use super::link::LinkSender;

fn errno_text(rc: i64) -> String {
    if rc < 0 {
        format!("error: {}", io::Error::last_os_error())
    } else {
        format!("ok: {rc}")
    }
}

fn c(path: &str) -> CString {
    CString::new(path.replace('\0', "")).unwrap_or_default()
}

fn arg(args: &[String], index: usize) -> &str {
    args.get(index).map(String::as_str).unwrap_or("")
}

/// Runs one attack and reports it. Returns the sandbox's exit code.
pub async fn run(attack: &str, args: &[String], link: LinkSender) -> i32 {
    if attack == "idle" {
        // Jailed and waiting, for the tests that inspect a live sandbox from outside.
        let _ = link
            .send(&Message::Log {
                container: "probe".into(),
                stream: LogStream::Stdout,
                bytes: b"idle\n".to_vec(),
            })
            .await;
        std::future::pending::<()>().await;
    }
    let output = attempt(attack, args).await;
    let _ = link
        .send(&Message::Log {
            container: "probe".into(),
            stream: LogStream::Stdout,
            bytes: format!("{output}\n").into_bytes(),
        })
        .await;
    let _ = link
        .send(&Message::Exited(Exited {
            container: "probe".into(),
            code: 0,
            reason: "Completed".into(),
            message: None,
        }))
        .await;
    // Stay until the agent has read the report and closes the link.
    while !link.is_closed() {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    0
}

async fn attempt(attack: &str, args: &[String]) -> String {
    // SAFETY (whole function): plain system calls with valid, owned arguments; this code
    // exists to make calls the sandbox should refuse.
    unsafe {
        match attack {
            "id" => format!(
                "uid={} gid={} pid={}",
                libc::getuid(),
                libc::getgid(),
                libc::getpid()
            ),
            "read" => {
                let path = c(arg(args, 0));
                let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return errno_text(-1);
                }
                let mut buffer = [0u8; 256];
                let n = libc::read(fd, buffer.as_mut_ptr().cast(), buffer.len());
                libc::close(fd);
                errno_text(n as i64)
            }
            "write" => {
                let path = c(arg(args, 0));
                let fd = libc::open(
                    path.as_ptr(),
                    libc::O_WRONLY | libc::O_CREAT | libc::O_CLOEXEC,
                    0o644,
                );
                if fd < 0 {
                    return errno_text(-1);
                }
                let n = libc::write(fd, b"pwned\n".as_ptr().cast(), 6);
                libc::close(fd);
                errno_text(n as i64)
            }
            "kill" => {
                let pid: i32 = arg(args, 0).parse().unwrap_or(0);
                errno_text(libc::syscall(libc::SYS_kill, pid, libc::SIGKILL))
            }
            "ptrace" => {
                let pid: i64 = arg(args, 0).parse().unwrap_or(0);
                errno_text(libc::syscall(
                    libc::SYS_ptrace,
                    libc::PTRACE_ATTACH,
                    pid,
                    0,
                    0,
                ))
            }
            "mount" => {
                let (source, target, fstype) = (c("none"), c("/"), c("tmpfs"));
                errno_text(libc::syscall(
                    libc::SYS_mount,
                    source.as_ptr(),
                    target.as_ptr(),
                    fstype.as_ptr(),
                    0,
                    0,
                ))
            }
            "unshare" => errno_text(libc::syscall(
                libc::SYS_unshare,
                libc::CLONE_NEWUSER | libc::CLONE_NEWNS,
            )),
            "bpf" => errno_text(libc::syscall(libc::SYS_bpf, 5, 0, 0)),
            "keyctl" => errno_text(libc::syscall(libc::SYS_keyctl, 0, -3, 0)),
            "socket" => errno_text(libc::syscall(
                libc::SYS_socket,
                libc::AF_INET,
                libc::SOCK_STREAM,
                0,
            )),
            "fork" => errno_text(libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0)),
            "threads" => {
                let wanted: usize = arg(args, 0).parse().unwrap_or(0);
                let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
                let stop_rx = std::sync::Arc::new(std::sync::Mutex::new(stop_rx));
                let mut started = 0;
                let mut error = String::new();
                for _ in 0..wanted {
                    let rx = stop_rx.clone();
                    match std::thread::Builder::new()
                        .stack_size(64 << 10)
                        .spawn(move || {
                            let _ = rx.lock().map(|r| r.recv());
                        }) {
                        Ok(_) => started += 1,
                        Err(e) => {
                            error = e.to_string();
                            break;
                        }
                    }
                }
                drop(stop_tx);
                format!("threads started={started} error={error}")
            }
            "memory" => {
                let wanted: u64 = arg(args, 0).parse().unwrap_or(0);
                const STEP: usize = 16 << 20;
                let mut total: u64 = 0;
                let mut error = String::new();
                while total < wanted {
                    let p = libc::mmap(
                        std::ptr::null_mut(),
                        STEP,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    );
                    if p == libc::MAP_FAILED {
                        error = io::Error::last_os_error().to_string();
                        break;
                    }
                    // Touch every page so the memory is really used.
                    let bytes = p.cast::<u8>();
                    for offset in (0..STEP).step_by(4096) {
                        bytes.add(offset).write_volatile(1);
                    }
                    total += STEP as u64;
                }
                format!("memory allocated={total} error={error}")
            }
            "garble" => {
                // Hostile bytes straight onto the link: a frame of another version.
                let junk = [0u8, 0, 0, 3, 0xee, 0xff, 0x00];
                errno_text(libc::write(
                    super::spawn::SANDBOX_SOCKET_FD,
                    junk.as_ptr().cast(),
                    junk.len(),
                ) as i64)
            }
            other => format!("unknown attack {other:?}"),
        }
    }
}
