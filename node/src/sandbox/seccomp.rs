//! The sandbox's seccomp allow-list: the system calls wasmtime, tokio and the WASI host
//! need to run guests that were compiled before the sandbox started, and nothing else.
//! Anything outside it kills the whole process (`SECCOMP_RET_KILL_PROCESS`); the agent
//! sees the SIGSYS and reports it.
//!
//! Deliberately absent: mount and umount, unshare, setns, clone with namespace flags (and
//! clone3, whose flags a filter cannot read; glibc falls back to clone), bpf, keyctl and
//! friends, ptrace, process_vm_*, perf_event_open, socket and connect (guests reach the
//! network only through the agent), kill of other processes, chroot, pivot_root, reboot,
//! module loading, setuid and the other credential calls, personality, userfaultfd.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Why the filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
#[error("seccomp: {0}")]
pub struct SeccompError(String);

fn arch() -> Result<TargetArch, SeccompError> {
    if cfg!(target_arch = "x86_64") {
        Ok(TargetArch::x86_64)
    } else if cfg!(target_arch = "aarch64") {
        Ok(TargetArch::aarch64)
    } else if cfg!(target_arch = "riscv64") {
        Ok(TargetArch::riscv64)
    } else {
        Err(SeccompError("no allow-list for this architecture".into()))
    }
}

/// System calls allowed with any arguments.
fn plain() -> Vec<libc::c_long> {
    let mut calls = vec![
        // memory
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mprotect,
        libc::SYS_madvise,
        libc::SYS_mremap,
        libc::SYS_brk,
        libc::SYS_membarrier,
        libc::SYS_mlock,
        libc::SYS_munlock,
        // threads, signals and time
        libc::SYS_futex,
        libc::SYS_set_robust_list,
        libc::SYS_get_robust_list,
        libc::SYS_rseq,
        libc::SYS_sched_yield,
        libc::SYS_sched_getaffinity,
        libc::SYS_gettid,
        libc::SYS_getpid,
        libc::SYS_getuid,
        libc::SYS_geteuid,
        libc::SYS_getgid,
        libc::SYS_getegid,
        libc::SYS_rt_sigaction,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_sigaltstack,
        libc::SYS_clock_gettime,
        libc::SYS_clock_getres,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_gettimeofday,
        libc::SYS_getrandom,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_getrlimit,
        libc::SYS_prlimit64,
        libc::SYS_uname,
        // I/O on descriptors the sandbox already has, and the event loop
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_lseek,
        libc::SYS_close,
        libc::SYS_recvfrom,
        libc::SYS_recvmsg,
        libc::SYS_sendto,
        libc::SYS_sendmsg,
        libc::SYS_shutdown,
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_pwait2,
        libc::SYS_eventfd2,
        libc::SYS_pipe2,
        libc::SYS_ppoll,
        libc::SYS_pselect6,
        libc::SYS_dup,
        libc::SYS_dup3,
        // the files of the pod's own volumes (the root is an empty read-only tmpfs)
        libc::SYS_openat,
        // cap-std resolves guest paths with RESOLVE_BENEATH through openat2
        libc::SYS_openat2,
        libc::SYS_newfstatat,
        libc::SYS_fstat,
        libc::SYS_statx,
        libc::SYS_fstatfs,
        libc::SYS_getdents64,
        libc::SYS_getcwd,
        libc::SYS_mkdirat,
        libc::SYS_unlinkat,
        libc::SYS_renameat2,
        libc::SYS_linkat,
        libc::SYS_symlinkat,
        libc::SYS_readlinkat,
        libc::SYS_faccessat,
        libc::SYS_faccessat2,
        libc::SYS_utimensat,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_ftruncate,
        libc::SYS_fallocate,
        libc::SYS_fadvise64,
        libc::SYS_flock,
    ];
    #[cfg(target_arch = "x86_64")]
    calls.extend([
        libc::SYS_epoll_wait,
        libc::SYS_poll,
        libc::SYS_arch_prctl,
        libc::SYS_open,
        libc::SYS_stat,
        libc::SYS_lstat,
        libc::SYS_readlink,
        libc::SYS_access,
        libc::SYS_dup2,
        libc::SYS_pipe,
        libc::SYS_time,
    ]);
    calls
}

fn rule(conditions: Vec<(u8, SeccompCmpOp, u64)>) -> Result<SeccompRule, SeccompError> {
    let conditions = conditions
        .into_iter()
        .map(|(arg, op, value)| {
            SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value)
                .map_err(|e| SeccompError(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    SeccompRule::new(conditions).map_err(|e| SeccompError(e.to_string()))
}

/// Builds the filter program.
pub fn program() -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for call in plain() {
        rules.insert(call, Vec::new());
    }
    // Allowed here only so that the second filter's ENOSYS is the verdict (see `install`).
    rules.insert(libc::SYS_clone3, Vec::new());
    // Threads only: clone must carry CLONE_THREAD (so no new process, and no namespace).
    let thread = libc::CLONE_THREAD as u64;
    let namespaces = (libc::CLONE_NEWNS
        | libc::CLONE_NEWUSER
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWCGROUP) as u64;
    rules.insert(
        libc::SYS_clone,
        vec![rule(vec![
            (0, SeccompCmpOp::MaskedEq(thread), thread),
            (0, SeccompCmpOp::MaskedEq(namespaces), 0),
        ])?],
    );
    // fcntl: descriptor and status flags only (no F_SETOWN games, no leases).
    rules.insert(
        libc::SYS_fcntl,
        [
            libc::F_GETFD,
            libc::F_SETFD,
            libc::F_GETFL,
            libc::F_SETFL,
            libc::F_DUPFD_CLOEXEC,
        ]
        .into_iter()
        .map(|cmd| rule(vec![(1, SeccompCmpOp::Eq, cmd as u64)]))
        .collect::<Result<_, _>>()?,
    );
    // ioctl: non-blocking and close-on-exec switches only (no TIOCSTI on an inherited tty).
    // The request's type differs between C libraries, hence the conversion.
    #[allow(clippy::useless_conversion)]
    rules.insert(
        libc::SYS_ioctl,
        [libc::FIONBIO, libc::FIOCLEX]
            .into_iter()
            .map(|cmd| rule(vec![(1, SeccompCmpOp::Eq, u64::from(cmd))]))
            .collect::<Result<_, _>>()?,
    );
    // prctl: naming threads and reading the few flags runtimes ask about.
    rules.insert(
        libc::SYS_prctl,
        [libc::PR_SET_NAME, libc::PR_GET_NAME, libc::PR_SET_VMA]
            .into_iter()
            .map(|op| rule(vec![(0, SeccompCmpOp::Eq, op as u64)]))
            .collect::<Result<_, _>>()?,
    );
    // Unix socket pairs only (tokio's I/O driver makes one for itself); no other socket.
    rules.insert(
        libc::SYS_socketpair,
        vec![rule(vec![(0, SeccompCmpOp::Eq, libc::AF_UNIX as u64)])?],
    );
    // Signals only to this process's own threads.
    // SAFETY: getpid cannot fail.
    let own = unsafe { libc::getpid() } as u64;
    rules.insert(
        libc::SYS_tgkill,
        vec![rule(vec![(0, SeccompCmpOp::Eq, own)])?],
    );
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        arch()?,
    )
    .map_err(|e| SeccompError(e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| SeccompError(e.to_string()))
}

/// Installs the filter on the calling thread (and so on every thread it starts later).
/// Call it last, single-threaded, after `no_new_privs`.
pub fn install() -> Result<(), SeccompError> {
    let program = program()?;
    let mut rules = BTreeMap::new();
    rules.insert(libc::SYS_clone3, vec![]);
    let clone3: BpfProgram = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch()?,
    )
    .and_then(|f| f.try_into())
    .map_err(|e| SeccompError(e.to_string()))?;
    // Two filters; the kernel takes the most restrictive verdict. clone3 returns ENOSYS
    // rather than running: its flags live in memory a filter cannot read, and glibc then
    // falls back to clone, whose flags the first filter checks.
    // The allow-list goes last: installing a filter calls prctl and seccomp, which it
    // forbids.
    seccompiler::apply_filter(&clone3).map_err(|e| SeccompError(e.to_string()))?;
    seccompiler::apply_filter(&program).map_err(|e| SeccompError(e.to_string()))?;
    Ok(())
}
