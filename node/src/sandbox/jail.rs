//! Sandbox side: building the jail, while the process is still single-threaded and still
//! privileged (host root in fresh mount, PID, IPC, UTS, network and cgroup namespaces).
//!
//! In order: a private mount tree; a fresh tmpfs root holding only the pod's compiled
//! artifacts (read-only binds) and its volume directories; `pivot_root` into it, with the
//! old root detached; the host name; then the user namespace (the agent writes the ID
//! maps, the process switches to uid and gid 0 inside, i.e. the pod's first host ID); the
//! rlimits that cap threads and memory where cgroups cannot; no core dumps, not dumpable,
//! killed with the agent; every capability dropped (bounding, ambient, effective,
//! permitted, inheritable); `no_new_privs`; and last the seccomp allow-list.
//!
//! Only this module may change the sandbox's privileges; nothing here runs guest code.

use std::ffi::CString;
use std::io;
use std::path::Path;

use brink_proto::sandbox::{Message, Setup};

use super::link::BlockingLink;

/// Why the jail could not be built. The sandbox reports it to the agent and exits.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("{step}: {source}")]
    Sys {
        step: String,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Protocol(String),
}

fn check(step: impl Into<String>, rc: libc::c_long) -> Result<(), JailError> {
    if rc < 0 {
        Err(JailError::Sys {
            step: step.into(),
            source: io::Error::last_os_error(),
        })
    } else {
        Ok(())
    }
}

fn cstr(path: &str) -> Result<CString, JailError> {
    CString::new(path).map_err(|_| JailError::Protocol(format!("path {path:?} holds a NUL byte")))
}

fn mount(
    source: Option<&str>,
    target: &str,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), JailError> {
    let source = source.map(cstr).transpose()?;
    let target_c = cstr(target)?;
    let fstype = fstype.map(cstr).transpose()?;
    let data = data.map(cstr).transpose()?;
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: mount with valid C strings (or nulls); the result is checked.
    let rc = unsafe {
        libc::mount(
            ptr(&source),
            target_c.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    };
    check(format!("mount {target}"), rc.into())
}

/// A path inside the new root must be absolute and plain: no `..`, no empty parts.
fn inside_path(root: &str, inside: &str) -> Result<String, JailError> {
    let plain = inside.starts_with('/')
        && inside[1..]
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..");
    if !plain {
        return Err(JailError::Protocol(format!(
            "{inside:?} is not a plain absolute path"
        )));
    }
    Ok(format!("{root}{inside}"))
}

fn create_dirs(path: &Path) -> Result<(), JailError> {
    std::fs::create_dir_all(path).map_err(|source| JailError::Sys {
        step: format!("create {}", path.display()),
        source,
    })
}

/// Builds the root, enters it and (for a user-namespaced pod) the user namespace, and
/// drops every privilege. On return the process is as weak as it will ever be, apart from
/// seccomp, which [`super::seccomp::install`] adds last.
pub fn build(setup: &Setup, link: &mut BlockingLink) -> Result<(), JailError> {
    let root = setup.root.trim_end_matches('/').to_string();
    if !root.starts_with('/') || root.len() < 2 {
        return Err(JailError::Protocol(format!(
            "sandbox root {:?} is not an absolute path",
            setup.root
        )));
    }
    // Nothing mounted from here on propagates back to the host.
    mount(None, "/", None, libc::MS_REC | libc::MS_PRIVATE, None)?;
    mount(
        Some("brink-sandbox"),
        &root,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some("size=1m,nr_inodes=1024,mode=0755"),
    )?;
    for (host, inside) in &setup.files {
        let target = inside_path(&root, inside)?;
        if let Some(parent) = Path::new(&target).parent() {
            create_dirs(parent)?;
        }
        std::fs::File::create(&target).map_err(|source| JailError::Sys {
            step: format!("create mount point {target}"),
            source,
        })?;
        mount(Some(host), &target, None, libc::MS_BIND, None)?;
        // Read-only, but executable: compiled code is mapped from this file.
        mount(
            None,
            &target,
            None,
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
            None,
        )?;
    }
    for bind in &setup.dirs {
        let target = inside_path(&root, &bind.inside)?;
        create_dirs(Path::new(&target))?;
        // Not recursive: mounts below a host directory stay out of the sandbox, and a
        // read-only bind cannot leave a writable submount behind.
        mount(Some(&bind.host), &target, None, libc::MS_BIND, None)?;
        let read_only = if bind.read_only { libc::MS_RDONLY } else { 0 };
        mount(
            None,
            &target,
            None,
            libc::MS_BIND
                | libc::MS_REMOUNT
                | libc::MS_NOSUID
                | libc::MS_NODEV
                | libc::MS_NOEXEC
                | read_only,
            None,
        )?;
    }
    // The root itself becomes read-only; the binds under it keep their own flags.
    mount(
        None,
        &root,
        None,
        libc::MS_BIND
            | libc::MS_REMOUNT
            | libc::MS_RDONLY
            | libc::MS_NOSUID
            | libc::MS_NODEV
            | libc::MS_NOEXEC,
        None,
    )?;
    let root_c = cstr(&root)?;
    let dot = cstr(".")?;
    let slash = cstr("/")?;
    // SAFETY: chdir, pivot_root and umount2 with valid C strings; results are checked.
    unsafe {
        check(
            "chdir into the new root",
            libc::chdir(root_c.as_ptr()).into(),
        )?;
        // pivot_root(".", ".") stacks the old root under the new one; detaching it leaves
        // nothing of the host reachable by path.
        check(
            "pivot_root",
            libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()),
        )?;
        check(
            "detach the old root",
            libc::umount2(dot.as_ptr(), libc::MNT_DETACH).into(),
        )?;
        check("chdir /", libc::chdir(slash.as_ptr()).into())?;
    }
    let hostname = setup.hostname.as_bytes();
    // SAFETY: sethostname with a valid buffer and length.
    check(
        "sethostname",
        unsafe { libc::sethostname(hostname.as_ptr().cast(), hostname.len().min(64)) }.into(),
    )?;

    // Supplementary groups would survive into the namespace and still grant host group
    // access, and after `setgroups=deny` they could not be dropped: clear them first.
    // SAFETY: raw setgroups with an empty list (single-threaded, so no glibc broadcast).
    check("clear supplementary groups", unsafe {
        libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>())
    })?;
    if setup.user_namespace {
        // SAFETY: unshare in a single-threaded process.
        check("unshare the user namespace", unsafe {
            libc::unshare(libc::CLONE_NEWUSER).into()
        })?;
        link.send(&Message::UsernsReady)
            .map_err(|e| JailError::Protocol(format!("telling the agent: {e}")))?;
        match link.recv() {
            Ok(Message::UsernsMapped) => {}
            Ok(other) => {
                return Err(JailError::Protocol(format!(
                    "expected the ID maps, got {other:?}"
                )));
            }
            Err(e) => return Err(JailError::Protocol(format!("waiting for the ID maps: {e}"))),
        }
        // Until it switches, the process still holds the host's root kuid.
        // SAFETY: raw id syscalls, single-threaded.
        unsafe {
            check("setresgid 0", libc::syscall(libc::SYS_setresgid, 0, 0, 0))?;
            check("setresuid 0", libc::syscall(libc::SYS_setresuid, 0, 0, 0))?;
        }
    }
    let limit = |resource, value: u64, name: &str| -> Result<(), JailError> {
        let rlim = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        // SAFETY: setrlimit with a valid struct.
        check(
            format!("set {name}"),
            unsafe { libc::setrlimit(resource, &rlim) }.into(),
        )
    };
    limit(libc::RLIMIT_NPROC, setup.max_threads, "RLIMIT_NPROC")?;
    limit(libc::RLIMIT_DATA, setup.max_data_bytes, "RLIMIT_DATA")?;
    limit(libc::RLIMIT_CORE, 0, "RLIMIT_CORE")?;
    limit(libc::RLIMIT_NOFILE, 4096, "RLIMIT_NOFILE")?;
    // SAFETY: prctl calls with constant arguments; results are checked.
    unsafe {
        // Changing credentials cleared the parent-death signal: arm it again.
        check(
            "arm the parent-death signal",
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong).into(),
        )?;
        check(
            "make the process undumpable",
            libc::prctl(libc::PR_SET_DUMPABLE, 0 as libc::c_ulong).into(),
        )?;
    }
    drop_capabilities()?;
    // SAFETY: prctl with constant arguments.
    check(
        "set no_new_privs",
        unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0) }.into(),
    )?;
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
const PR_CAP_AMBIENT: libc::c_int = 47;
const PR_CAP_AMBIENT_CLEAR_ALL: libc::c_ulong = 4;

/// Drops every capability: from the bounding set (so no exec can regain one), the ambient
/// set, and the effective, permitted and inheritable sets.
pub fn drop_capabilities() -> Result<(), JailError> {
    // SAFETY: prctl and capset with valid arguments; results are checked.
    unsafe {
        for cap in 0..64 {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong) != 0 {
                // EINVAL: past the last capability this kernel knows.
                if io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                    break;
                }
                return Err(JailError::Sys {
                    step: format!("drop capability {cap} from the bounding set"),
                    source: io::Error::last_os_error(),
                });
            }
        }
        check(
            "clear ambient capabilities",
            libc::prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0).into(),
        )?;
        let header = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let data = [CapData::default(); 2];
        check(
            "clear capabilities",
            libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()),
        )?;
    }
    Ok(())
}
