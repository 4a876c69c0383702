//! Makes a stopped tracee thread run one system call for us (`userfaultfd`, `close`,
//! `mprotect`: calls that act on the caller's own address space).
//!
//! The thread is pointed at a `syscall` instruction that already exists in the process (in
//! the vDSO, else in any executable mapping), single-stepped over it, and put back exactly as
//! it was: no byte of the program changes. Its `orig_rax` is set to -1 meanwhile, so the
//! kernel does not take the injected call for an interrupted one to restart; the original
//! registers (an interrupted call's included) are restored afterwards, so a call the thread
//! was blocked in restarts as it would have.

use crate::tracer::{ptrace, siginfo_code, wait_for, TRAP_HWBKPT};
use anyhow::{bail, Context, Result};

/// `syscall` on x86-64.
const SYSCALL_INSN: [u8; 2] = [0x0f, 0x05];
/// The resume flag: set by the kernel on a thread that hit an execution breakpoint, so that
/// the instruction runs once without trapping again.
const EFLAGS_RF: u64 = 1 << 16;

fn get_regs(tid: i32) -> std::io::Result<libc::user_regs_struct> {
    // SAFETY: user_regs_struct is plain old data: all-zero bytes are a valid value.
    let mut regs: libc::user_regs_struct = unsafe { std::mem::zeroed() };
    ptrace(libc::PTRACE_GETREGS, tid, 0, &mut regs as *mut _ as usize)?;
    Ok(regs)
}

fn set_regs(tid: i32, regs: &libc::user_regs_struct) -> std::io::Result<()> {
    ptrace(libc::PTRACE_SETREGS, tid, 0, regs as *const _ as usize).map(|_| ())
}

/// The address of a `syscall` instruction in process `pid`: the vDSO's first, else one in
/// another executable mapping.
pub fn find_syscall_insn(pid: i32) -> Result<u64> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .with_context(|| format!("cannot read process {pid}'s mappings"))?;
    let mut exec: Vec<crate::record::Mapping> = crate::record::parse_maps(&maps)
        .into_iter()
        .filter(|m| m.perms.as_bytes().get(2) == Some(&b'x') && m.path != "[vsyscall]")
        .collect();
    // The vDSO first: small, and always there.
    exec.sort_by_key(|m| m.path != "[vdso]");
    let mut buf = vec![0u8; 1 << 20];
    for m in exec {
        let mut at = m.start;
        while at < m.end {
            let n = ((m.end - at) as usize).min(buf.len());
            let got = crate::record::read_remote(pid, at, &mut buf[..n]);
            if let Some(i) = buf[..got].windows(2).position(|w| w == SYSCALL_INSN) {
                return Ok(at + i as u64);
            }
            if got < n {
                break;
            }
            // Overlap by one byte so an instruction across the boundary is found.
            at += (n as u64).saturating_sub(1).max(1);
        }
    }
    bail!("process {pid} has no syscall instruction mapped")
}

/// Runs system call `nr` with `args` in thread `tid` of process `pid`, which must be in a
/// ptrace stop other than a group stop; returns what it returned (a negative errno on
/// failure). `insn` is from [`find_syscall_insn`]. The thread stays stopped, its registers as
/// before; a signal that arrived meanwhile is queued again.
pub fn syscall(pid: i32, tid: i32, insn: u64, nr: i64, args: &[u64]) -> Result<i64> {
    let saved = get_regs(tid).with_context(|| format!("thread {tid}: PTRACE_GETREGS"))?;
    let mut regs = saved;
    regs.rax = nr as u64;
    regs.orig_rax = u64::MAX; // not in a system call: nothing to restart
    regs.rip = insn;
    let slots = [
        &mut regs.rdi,
        &mut regs.rsi,
        &mut regs.rdx,
        &mut regs.r10,
        &mut regs.r8,
        &mut regs.r9,
    ];
    for (slot, &a) in slots.into_iter().zip(args) {
        *slot = a;
    }
    set_regs(tid, &regs).with_context(|| format!("thread {tid}: PTRACE_SETREGS"))?;
    let mut deferred = Vec::new();
    let mut breakpoint_hit = false;
    let result = step_over_syscall(tid, insn, &mut deferred, &mut breakpoint_hit);
    // Put the thread back whatever happened. A breakpoint it had hit but not yet reported
    // (its SIGTRAP was still queued when it was stopped) was swallowed by the steps: without
    // the resume flag the thread hits it again, and reports it, when it resumes.
    let mut saved = saved;
    if breakpoint_hit {
        saved.eflags &= !EFLAGS_RF;
    }
    let restored = set_regs(tid, &saved);
    for sig in deferred {
        // SAFETY: sending a signal to a thread of the traced process.
        unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, sig) };
    }
    let rax = result?;
    restored.with_context(|| format!("thread {tid}: restoring its registers"))?;
    Ok(rax)
}

/// Single-steps `tid` until it is past the `syscall` at `insn`; returns `rax` then. Signals
/// that stop the thread on the way are held back in `deferred`; a breakpoint's SIGTRAP met on
/// the way sets `breakpoint_hit`.
fn step_over_syscall(
    tid: i32,
    insn: u64,
    deferred: &mut Vec<i32>,
    breakpoint_hit: &mut bool,
) -> Result<i64> {
    // A few steps at most: a step can report before the instruction ran (resuming from a stop
    // inside a system call reports the step of that call's exit first), or a signal can come.
    for _ in 0..8 {
        ptrace(libc::PTRACE_SINGLESTEP, tid, 0, 0)
            .with_context(|| format!("thread {tid}: PTRACE_SINGLESTEP"))?;
        let status = wait_for(tid)?;
        if !libc::WIFSTOPPED(status) {
            bail!("thread {tid} exited during an injected system call");
        }
        let sig = libc::WSTOPSIG(status);
        let event = (status >> 16) & 0xff;
        if event == 0 && sig != libc::SIGTRAP {
            deferred.push(sig);
        }
        if event == 0 && sig == libc::SIGTRAP && siginfo_code(tid) == Some(TRAP_HWBKPT) {
            *breakpoint_hit = true;
        }
        let regs = get_regs(tid)?;
        if regs.rip == insn + SYSCALL_INSN.len() as u64 {
            return Ok(regs.rax as i64);
        }
        if regs.rip != insn {
            bail!(
                "thread {tid} left the injected system call at {:#x}",
                regs.rip
            );
        }
    }
    bail!("thread {tid} did not run the injected system call")
}
