//! Defence in depth for the serving phase. Once the disk is built and the
//! client has chosen it, all the process still does is read and write two
//! fds (the client, the image), allocate memory, log, and exit; a seccomp
//! filter (with PR_SET_NO_NEW_PRIVS) allows that and nothing else. A bug
//! exploited through the protocol then cannot open files, run programs or
//! make network connections. Any other call fails with EPERM rather than
//! killing the process, so a missed entry shows as an error reply, not a
//! dead client.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// System calls the serving loop makes, and why.
const ALLOWED: &[i64] = &[
    // The request loop: client fd and image fd.
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_lseek,     // SEEK_DATA / SEEK_HOLE
    libc::SYS_fallocate, // TRIM, WRITE_ZEROES
    libc::SYS_fadvise64, // CACHE
    libc::SYS_sendfile,
    libc::SYS_splice,
    libc::SYS_pipe2,
    libc::SYS_fcntl,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_newfstatat,
    libc::SYS_ppoll,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    // A tokened disk's holder (see reconnect.rs): a taker connects, proves
    // the key (read with a timeout), gets the files; the name is removed.
    libc::SYS_accept4,
    libc::SYS_setsockopt,
    libc::SYS_recvmsg,
    libc::SYS_unlinkat,
    libc::SYS_close,
    // Memory.
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_mprotect,
    // Logging to the journal (tracing-journald passes big records in a
    // sealed memfd) and sd_notify (a datagram on a new AF_UNIX socket,
    // allowed below with its domain checked).
    libc::SYS_memfd_create,
    libc::SYS_ftruncate,
    libc::SYS_connect,
    libc::SYS_getpid,
    libc::SYS_gettid,
    // Time, signals, threads' leftovers, exit.
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_futex,
    libc::SYS_rt_sigreturn,
    // A poll stopped by SIGSTOP/SIGCONT (a debugger, `kill -STOP`) resumes
    // through restart_syscall: without it the resumed poll failed with
    // EPERM and the client was dropped (seen in tests/write_accounting.rs,
    // which stops the server on purpose).
    libc::SYS_restart_syscall,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigaction,
    libc::SYS_sigaltstack,
    libc::SYS_sched_yield,
    libc::SYS_getrandom,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// Calls only x86_64 has (aarch64 has just the *at/ppoll forms above).
#[cfg(target_arch = "x86_64")]
const ALLOWED_X86_64: &[i64] = &[libc::SYS_poll, libc::SYS_accept, libc::SYS_unlink];
#[cfg(not(target_arch = "x86_64"))]
const ALLOWED_X86_64: &[i64] = &[];

/// Why a seccomp filter could not be built or installed.
#[derive(Debug)]
pub enum SandboxError {
    /// The rules do not compile into a filter for this architecture.
    Build(String),
    /// The kernel refused the filter.
    Apply(seccompiler::Error),
}

impl std::fmt::Display for SandboxError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SandboxError::Build(why) => write!(f, "seccomp filter: {why}"),
            SandboxError::Apply(e) => write!(f, "seccomp: {e}"),
        }
    }
}

/// The one way filters are built here: `rules` (system call number →
/// conditions, empty for "always"), what a call that matches gets, and
/// what every other call gets.
fn build(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, SandboxError> {
    let bad = |e: &dyn std::fmt::Display| SandboxError::Build(e.to_string());
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| bad(&e))?;
    let filter = SeccompFilter::new(rules, mismatch, matched, arch).map_err(|e| bad(&e))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| bad(&e))
}

/// A rule that matches when argument `arg`'s low 32 bits equal `value`
/// (both uses are 32-bit: a socket's domain, an ioctl's request).
fn arg_equals(arg: u8, value: u64) -> Result<SeccompRule, SandboxError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
        .and_then(|c| SeccompRule::new(vec![c]))
        .map_err(|e| SandboxError::Build(e.to_string()))
}

/// Restrict the process to the serving loop's system calls.
pub fn lock_down() -> Result<(), SandboxError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = ALLOWED
        .iter()
        .chain(ALLOWED_X86_64)
        .map(|&nr| (nr, Vec::new()))
        .collect();
    // New sockets only for sd_notify: AF_UNIX, nothing that reaches a network.
    rules.insert(libc::SYS_socket, vec![arg_equals(0, libc::AF_UNIX as u64)?]);
    // ioctl only to ask how much of our output the client has not taken
    // (conn.rs: sendfile or copy). The request is an unsigned long whose
    // numbers fit in 32 bits; the libc crate types it c_ulong for glibc
    // and c_int for musl, hence the cast.
    #[allow(clippy::unnecessary_cast)]
    let outq = arg_equals(1, libc::TIOCOUTQ as u64)?;
    rules.insert(libc::SYS_ioctl, vec![outq]);
    let program = build(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
    )?;
    // Sets PR_SET_NO_NEW_PRIVS, then installs the filter in every thread
    // (TSYNC): a reconnect holder's thread, started before, gets it too.
    seccompiler::apply_filter_all_threads(&program).map_err(SandboxError::Apply)
}

/// mkfs's filter: fsync, fdatasync, syncfs, sync and sync_file_range
/// return 0 at once, everything else is allowed. The image dies with the
/// process, so flushing it to the platter is pure waste: 23 ms of
/// mkfs.ext4's 36 ms on a 16 GiB image was its final fsync (measured when
/// the filter was added). Built before the fork (it allocates) and
/// installed in the child by `sys::prepare_child`.
pub fn no_sync_filter() -> Result<BpfProgram, SandboxError> {
    let rules = [
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_syncfs,
        libc::SYS_sync,
        libc::SYS_sync_file_range,
    ]
    .into_iter()
    .map(|nr| (nr, Vec::new()))
    .collect();
    build(rules, SeccompAction::Allow, SeccompAction::Errno(0))
}
