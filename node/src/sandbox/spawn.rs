//! Agent side: creating a sandbox process and waiting for it.
//!
//! The agent is a multi-threaded tokio process, so the child of `clone3` may only make raw
//! system calls until it has called `execve` (another thread may hold the allocator's lock,
//! and glibc's id-changing wrappers signal threads the child does not have). Everything the
//! child needs is prepared before the clone; the child only moves file descriptors, arms
//! its parent-death signal and executes `brink sandbox-init` in its new mount, PID, IPC,
//! UTS, network and cgroup namespaces. The user namespace comes later, from inside, once the
//! jail is built (see `jail`).
//!
//! Clones happen on one long-lived thread: a parent-death signal fires when the *thread*
//! that forked exits, and tokio's blocking threads come and go.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::OnceLock;
use std::sync::mpsc;

use tokio::io::unix::AsyncFd;

/// The hidden subcommand of the `brink` binary that a sandbox runs.
pub const SANDBOX_SUBCOMMAND: &str = "sandbox-init";
/// The file descriptor on which a sandbox finds its end of the socket pair.
pub const SANDBOX_SOCKET_FD: RawFd = 3;

const CLONE_PIDFD: u64 = 0x1000;
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
const P_PIDFD: libc::idtype_t = 3;

/// The namespaces every sandbox gets at birth (the user namespace follows from inside).
const NAMESPACES: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP) as u64;

/// The kernel's `struct clone_args` (version 0, 64 bytes).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
}

/// A sandbox process as the agent sees it.
pub struct SandboxProcess {
    /// Its PID in the agent's PID namespace.
    pub pid: i32,
    pidfd: AsyncFd<OwnedFd>,
    /// The agent's end of the socket pair.
    pub socket: UnixStream,
}

/// How a sandbox process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessEnd {
    Exited(i32),
    Signaled(i32),
}

impl std::fmt::Display for ProcessEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProcessEnd::Exited(code) => write!(f, "exited with code {code}"),
            ProcessEnd::Signaled(signal) => write!(f, "killed by {}", signal_name(*signal)),
        }
    }
}

/// A signal's name, with what it usually means for a sandbox.
pub fn signal_name(signal: i32) -> String {
    match signal {
        libc::SIGSYS => "SIGSYS (a system call outside the seccomp allow-list)".into(),
        libc::SIGKILL => "SIGKILL".into(),
        libc::SIGSEGV => "SIGSEGV".into(),
        libc::SIGABRT => "SIGABRT".into(),
        libc::SIGBUS => "SIGBUS".into(),
        other => format!("signal {other}"),
    }
}

impl SandboxProcess {
    /// Sends SIGKILL (through the pidfd, so never to a recycled PID).
    pub fn kill(&self) {
        // SAFETY: a plain system call on a pidfd this value owns.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.get_ref().as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            );
        }
    }

    /// Waits for the process to end and reaps it.
    pub async fn wait(&self) -> io::Result<ProcessEnd> {
        loop {
            let mut guard = self.pidfd.readable().await?;
            match reap(self.pidfd.get_ref().as_raw_fd(), libc::WNOHANG)? {
                Some(end) => return Ok(end),
                None => guard.clear_ready(),
            }
        }
    }
}

/// Reaps the process behind `pidfd`: `None` while it still runs.
fn reap(pidfd: RawFd, flags: libc::c_int) -> io::Result<Option<ProcessEnd>> {
    // SAFETY: `info` is a plain struct the kernel fills in.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid on a pidfd we own, with a valid siginfo pointer.
    let rc = unsafe {
        libc::waitid(
            P_PIDFD,
            pidfd as libc::id_t,
            &mut info,
            libc::WEXITED | flags,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: after a successful waitid the pid and status fields are initialised.
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if pid == 0 {
        return Ok(None);
    }
    Ok(Some(if info.si_code == libc::CLD_EXITED {
        ProcessEnd::Exited(status)
    } else {
        ProcessEnd::Signaled(status)
    }))
}

struct SpawnRequest {
    reply: tokio::sync::oneshot::Sender<io::Result<(i32, OwnedFd, UnixStream)>>,
}

/// Starts a sandbox process. Its set-up is up to the caller, over `socket`.
pub async fn spawn() -> io::Result<SandboxProcess> {
    static SPAWNER: OnceLock<Result<mpsc::Sender<SpawnRequest>, String>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (sender, receiver) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("brink-spawner".into())
            .spawn(move || {
                let exe = open_self_exe();
                for request in receiver {
                    let result = match &exe {
                        Ok(exe) => clone_sandbox(exe.as_raw_fd()),
                        Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
                    };
                    let _ = request.reply.send(result);
                }
            })
            .map(|_| sender)
            .map_err(|e| format!("cannot start the spawner thread: {e}"))
    });
    let spawner = spawner.as_ref().map_err(|e| io::Error::other(e.clone()))?;
    let (reply, answer) = tokio::sync::oneshot::channel();
    spawner
        .send(SpawnRequest { reply })
        .map_err(|_| io::Error::other("the spawner thread is gone"))?;
    let (pid, pidfd, socket) = answer
        .await
        .map_err(|_| io::Error::other("the spawner thread is gone"))??;
    Ok(SandboxProcess {
        pid,
        // SAFETY: the pidfd is owned by the AsyncFd alone and closed only when it drops.
        pidfd: unsafe { AsyncFd::register(pidfd) }.map_err(io::Error::from)?,
        socket,
    })
}

fn open_cloexec(path: &str, flags: libc::c_int) -> io::Result<OwnedFd> {
    let path = CString::new(path).map_err(io::Error::other)?;
    // SAFETY: open with a valid C string; the result is checked.
    let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn open_self_exe() -> io::Result<OwnedFd> {
    open_cloexec("/proc/self/exe", libc::O_PATH)
}

/// Which side of a [`clone_process`] this is.
enum Forked {
    Child,
    Parent { pid: i32, pidfd: OwnedFd },
}

/// `clone3` with fork semantics (no CLONE_VM), a pidfd, and SIGCHLD on exit.
///
/// # Safety
/// In a multi-threaded process the child may only make raw system calls on memory
/// prepared before the call, until it executes or exits. This function allocates nothing
/// on the child's side.
unsafe fn clone_process(flags: u64) -> io::Result<Forked> {
    let mut pidfd: RawFd = -1;
    let args = CloneArgs {
        flags: flags | CLONE_PIDFD,
        pidfd: &mut pidfd as *mut RawFd as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..Default::default()
    };
    // SAFETY: a valid clone_args of the size passed; see the function's contract.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    match pid {
        0 => Ok(Forked::Child),
        p if p < 0 => Err(io::Error::last_os_error()),
        // SAFETY: clone3 stored a fresh pidfd for the child.
        p => Ok(Forked::Parent {
            pid: p as i32,
            pidfd: unsafe { OwnedFd::from_raw_fd(pidfd) },
        }),
    }
}

/// Moves `fd` to a number of at least 10, so that placing the socket at 3 in the child
/// never overwrites another descriptor the child still needs.
fn high_fd(fd: OwnedFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor we own; the result is checked.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

fn clone_sandbox(exe: RawFd) -> io::Result<(i32, OwnedFd, UnixStream)> {
    let (agent_end, sandbox_end) = UnixStream::pair()?;
    let sandbox_end = high_fd(OwnedFd::from(sandbox_end))?;
    // The child reports a failed exec through this pipe; a successful exec closes it.
    let mut pipe = [0 as RawFd; 2];
    // SAFETY: pipe2 fills in two descriptors; the result is checked.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: two fresh descriptors we own.
    let (report_read, report_write) =
        unsafe { (OwnedFd::from_raw_fd(pipe[0]), OwnedFd::from_raw_fd(pipe[1])) };
    let report_write = high_fd(report_write)?;
    let devnull = high_fd(open_cloexec("/dev/null", libc::O_RDONLY)?)?;
    let argv0 = CString::new("brink").map_err(io::Error::other)?;
    let argv1 = CString::new(SANDBOX_SUBCOMMAND).map_err(io::Error::other)?;
    let empty = CString::new("").map_err(io::Error::other)?;
    let argv = [argv0.as_ptr(), argv1.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null::<libc::c_char>()];

    let (sock, report, null) = (
        sandbox_end.as_raw_fd(),
        report_write.as_raw_fd(),
        devnull.as_raw_fd(),
    );
    // SAFETY: in the child only raw system calls follow, on memory prepared above, until
    // execveat or _exit.
    let forked = unsafe { clone_process(NAMESPACES)? };
    let (pid, pidfd) = match forked {
        Forked::Parent { pid, pidfd } => (pid, pidfd),
        // SAFETY: raw system calls only; see above.
        Forked::Child => unsafe {
            let fail = |stage: u8| -> ! {
                let errno = *libc::__errno_location();
                let mut message = [0u8; 5];
                message[0] = stage;
                message[1..].copy_from_slice(&errno.to_ne_bytes());
                libc::write(report, message.as_ptr().cast(), message.len());
                libc::_exit(127)
            };
            if libc::dup3(sock, SANDBOX_SOCKET_FD, 0) < 0 {
                fail(1);
            }
            if libc::dup3(null, 0, 0) < 0 {
                fail(2);
            }
            // Panics of the sandbox itself go to the agent's stderr; if the agent has none,
            // the sandbox writes into the void.
            libc::dup3(2, 1, 0);
            if libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, CLOSE_RANGE_CLOEXEC) != 0 {
                fail(3);
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                fail(4);
            }
            libc::syscall(
                libc::SYS_execveat,
                exe,
                empty.as_ptr(),
                argv.as_ptr(),
                envp.as_ptr(),
                libc::AT_EMPTY_PATH,
            );
            fail(5);
        },
    };
    drop((sandbox_end, report_write, devnull));
    let mut message = [0u8; 5];
    let mut read = 0;
    while read < message.len() {
        // SAFETY: reading into our own buffer from a pipe we own.
        let n = unsafe {
            libc::read(
                report_read.as_raw_fd(),
                message[read..].as_mut_ptr().cast(),
                message.len() - read,
            )
        };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        if n <= 0 {
            break;
        }
        read += n as usize;
    }
    if read == 0 {
        return Ok((pid, pidfd, agent_end));
    }
    let _ = reap(pidfd.as_raw_fd(), 0);
    let errno = i32::from_ne_bytes([message[1], message[2], message[3], message[4]]);
    let stage = match message[0] {
        1 | 2 => "placing its descriptors",
        3 => "closing inherited descriptors",
        4 => "arming its parent-death signal",
        _ => "executing the brink binary",
    };
    Err(io::Error::other(format!(
        "the sandbox failed {stage}: {}",
        io::Error::from_raw_os_error(errno)
    )))
}

/// Whether this host lets the agent give pods user namespaces, and why not if it cannot:
/// a child is cloned into a new user namespace and exits at once.
pub fn user_namespaces_available() -> Result<(), String> {
    if let Ok(max) = std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
        && max.trim() == "0"
    {
        return Err(
            "user namespaces are disabled on this host (user.max_user_namespaces = 0)".into(),
        );
    }
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(
            "the node agent is not root, so it cannot map a pod's 65,536 IDs into a user namespace"
                .into(),
        );
    }
    // SAFETY: the child only calls _exit.
    match unsafe { clone_process(libc::CLONE_NEWUSER as u64) } {
        // SAFETY: the child exits at once.
        Ok(Forked::Child) => unsafe { libc::_exit(0) },
        Ok(Forked::Parent { pidfd, .. }) => {
            let _ = reap(pidfd.as_raw_fd(), 0);
        }
        Err(e) => return Err(format!("this host refuses to create a user namespace: {e}")),
    }
    Ok(())
}
