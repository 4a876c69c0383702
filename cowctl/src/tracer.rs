//! A ptrace tracer for `cowctl record`: starts a program seized (`PTRACE_SEIZE`, all its
//! threads followed), stops every thread for a consistent cut, reads their registers, passes
//! every signal on unchanged, and reports when a thread enters one of up to 4 functions
//! (hardware execution breakpoints in every thread's debug registers: no byte of the program's
//! code changes, so no thread can run into a half-written breakpoint).

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::ffi::CString;

/// A thread's state as the tracer knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Running,
    /// Stopped by us or by an event; `sig` is delivered when it resumes.
    Stopped {
        sig: i32,
        group: bool,
    },
}

/// What a wait status meant for the caller.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// The process is gone: its exit code or 128 + the signal that killed it.
    Exited(i32),
    /// A fatal synchronous signal is about to be delivered to `tid` (it waits stopped).
    Crash { tid: i32, sig: i32 },
    /// The process's main thread is exiting (it waits stopped, memory intact).
    Exiting,
    /// The process exec'd a program (its one thread waits stopped, breakpoints disarmed).
    Exec,
    /// `tid` is at the first instruction of breakpoint `index` (it waits stopped).
    Breakpoint { tid: i32, index: usize },
}

/// A traced process.
pub struct Tracee {
    /// The process id.
    pub pid: i32,
    threads: BTreeMap<i32, State>,
    stopping: bool,
    /// A fatal signal waiting for delivery (seen in any wait), until taken.
    crash: Option<(i32, i32)>,
    /// The main thread reported its exit (seen in any wait), until taken.
    exiting: bool,
    /// Threads that hit a breakpoint (seen in any wait), in order, until taken.
    hits: Vec<i32>,
    /// The process exec'd (seen in any wait), until taken.
    execed: bool,
    /// Execution breakpoints (at most 4 addresses), armed in every thread.
    breakpoints: Vec<u64>,
    /// Threads whose debug registers hold `breakpoints`.
    armed: std::collections::HashSet<i32>,
    /// Threads stopped at their exit (they cannot run anything any more).
    exiting_threads: std::collections::HashSet<i32>,
    /// Threads stopped at an event inside a system call (clone, exec, …): the call has not
    /// returned, so their registers do not hold its result yet.
    in_syscall: std::collections::HashSet<i32>,
}

/// Debug registers available for execution breakpoints (DR0-DR3).
pub const MAX_BREAKPOINTS: usize = 4;
/// `si_code` of the SIGTRAP a hardware breakpoint raises.
pub(crate) const TRAP_HWBKPT: i32 = 4;

/// Where debug register `n` sits in `struct user` (for PTRACE_PEEKUSER/POKEUSER).
fn debugreg(n: usize) -> usize {
    std::mem::offset_of!(libc::user, u_debugreg) + n * 8
}

/// `ptrace(req, tid, addr, data)`, its failure as an `io::Error`.
pub(crate) fn ptrace(
    req: libc::c_uint,
    tid: i32,
    addr: usize,
    data: usize,
) -> std::io::Result<libc::c_long> {
    // SAFETY: the requests used here take integers or pointers to buffers we own.
    let r = unsafe { libc::ptrace(req, tid, addr, data) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Options of a program we attach to: it outlives us.
const ATTACH_OPTIONS: usize =
    (libc::PTRACE_O_TRACECLONE | libc::PTRACE_O_TRACEEXIT | libc::PTRACE_O_TRACEEXEC) as usize;
/// Options of a program we start: it dies with us.
const OPTIONS: usize = ATTACH_OPTIONS | libc::PTRACE_O_EXITKILL as usize;

/// Signals after which the program cannot go on: the recorder checkpoints the faulting state.
fn is_fatal(sig: i32) -> bool {
    matches!(
        sig,
        libc::SIGSEGV | libc::SIGBUS | libc::SIGILL | libc::SIGFPE | libc::SIGABRT | libc::SIGSYS
    )
}

/// The next wait status of thread `tid` (one of our tracees), waiting for it.
pub(crate) fn wait_for(tid: i32) -> Result<i32> {
    let mut status = 0;
    // SAFETY: waiting for one of our tracees into a local.
    while unsafe { libc::waitpid(tid, &mut status, libc::__WALL) } != tid {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e).context(format!("thread {tid}: waitpid"));
        }
    }
    Ok(status)
}

/// Whether a hardware breakpoint's SIGTRAP is queued for `tid` (in a ptrace stop).
fn breakpoint_trap_queued(tid: i32) -> bool {
    #[repr(C)]
    struct PeekArgs {
        off: u64,
        flags: u32,
        nr: i32,
    }
    let args = PeekArgs {
        off: 0,
        flags: 0,
        nr: 8,
    };
    // SAFETY: siginfo_t is plain old data: all-zero bytes are a valid value.
    let mut queue: [libc::siginfo_t; 8] = unsafe { std::mem::zeroed() };
    let Ok(n) = ptrace(
        libc::PTRACE_PEEKSIGINFO,
        tid,
        &args as *const _ as usize,
        queue.as_mut_ptr() as usize,
    ) else {
        return false;
    };
    queue[..(n as usize).min(8)]
        .iter()
        .any(|i| i.si_signo == libc::SIGTRAP && i.si_code == TRAP_HWBKPT)
}

/// The `si_code` of the signal `tid` is stopped with.
pub(crate) fn siginfo_code(tid: i32) -> Option<i32> {
    // SAFETY: siginfo_t is plain old data, filled by the kernel.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    ptrace(
        libc::PTRACE_GETSIGINFO,
        tid,
        0,
        &mut info as *mut _ as usize,
    )
    .ok()?;
    Some(info.si_code)
}

impl Tracee {
    /// A tracee whose `threads` were just seized, nothing seen of them yet.
    fn with_threads(pid: i32, threads: BTreeMap<i32, State>) -> Self {
        Tracee {
            pid,
            threads,
            stopping: false,
            crash: None,
            exiting: false,
            hits: Vec::new(),
            execed: false,
            breakpoints: Vec::new(),
            armed: Default::default(),
            exiting_threads: Default::default(),
            in_syscall: Default::default(),
        }
    }

    /// Starts `path` with `argv` and `envp`, traced from its first instruction.
    pub fn spawn(path: &CString, argv: &[CString], envp: &[CString]) -> Result<Self> {
        let mut args: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        args.push(std::ptr::null());
        let mut env: Vec<*const libc::c_char> = envp.iter().map(|a| a.as_ptr()).collect();
        env.push(std::ptr::null());
        // The child waits on a pipe until it is seized, so it execs traced.
        let mut gate = [0i32; 2];
        // SAFETY: pipe2 writes two descriptors into the array.
        if unsafe { libc::pipe2(gate.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            bail!("pipe: {}", std::io::Error::last_os_error());
        }
        // SAFETY: fork in a process whose other threads hold no lock the child needs: the child
        // only reads a pipe and execs (both async-signal-safe) with memory prepared above.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            bail!("fork: {}", std::io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: async-signal-safe calls only; on exec failure exit at once.
            unsafe {
                let mut none: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut none);
                libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
                libc::close(gate[1]);
                let mut b = 0u8;
                while libc::read(gate[0], (&mut b as *mut u8).cast(), 1) < 0 {}
                libc::execve(path.as_ptr(), args.as_ptr(), env.as_ptr());
                libc::_exit(127);
            }
        }
        // SAFETY: closing our copy of the read end.
        unsafe { libc::close(gate[0]) };
        let seized = ptrace(libc::PTRACE_SEIZE, pid, 0, OPTIONS).context("PTRACE_SEIZE");
        // SAFETY: closing the write end releases the child (EOF), seized or not.
        unsafe { libc::close(gate[1]) };
        seized?;
        Ok(Tracee::with_threads(
            pid,
            BTreeMap::from([(pid, State::Running)]),
        ))
    }

    /// Seizes every thread of the running process `pid` (they keep running). It is not
    /// killed if we die; [`Tracee::detach`] lets it go.
    pub fn attach(pid: i32) -> Result<Self> {
        let mut threads = BTreeMap::new();
        // Threads created meanwhile are followed by the seized ones (TRACECLONE) or show up
        // in the next listing: seize until a listing brings nothing new.
        loop {
            let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
                .with_context(|| format!("no process {pid}"))?;
            let mut new = 0;
            for t in tasks.flatten() {
                let Some(tid) = t.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                    continue;
                };
                if threads.contains_key(&tid) {
                    continue;
                }
                match ptrace(libc::PTRACE_SEIZE, tid, 0, ATTACH_OPTIONS) {
                    Ok(_) => {
                        threads.insert(tid, State::Running);
                        new += 1;
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {} // it just exited
                    Err(e) => {
                        let why = if e.raw_os_error() == Some(libc::EPERM) {
                            " (another user's process, a tracer attached already, or \
                             kernel.yama.ptrace_scope forbids it)"
                        } else {
                            ""
                        };
                        return Err(anyhow::Error::new(e)
                            .context(format!("cannot trace process {pid}{why}")));
                    }
                }
            }
            if new == 0 {
                break;
            }
        }
        if threads.is_empty() {
            bail!("no process {pid}");
        }
        Ok(Tracee::with_threads(pid, threads))
    }

    /// Lets an attached process go: every thread stopped, its breakpoints cleared (debug
    /// registers outlive a detach) and detached with the signal it was stopped with.
    pub fn detach(&mut self) -> Result<()> {
        if let Some(Event::Exited(_)) = self.stop_all()? {
            return Ok(());
        }
        for tid in self.armed.clone() {
            self.discard_breakpoint_trap(tid)?;
        }
        for (tid, st) in std::mem::take(&mut self.threads) {
            if self.armed.contains(&tid) {
                let _ = ptrace(libc::PTRACE_POKEUSER, tid, debugreg(7), 0);
                for n in 0..MAX_BREAKPOINTS {
                    let _ = ptrace(libc::PTRACE_POKEUSER, tid, debugreg(n), 0);
                }
            }
            let sig = match st {
                State::Stopped { sig, .. } => sig,
                State::Running => 0,
            };
            let _ = ptrace(libc::PTRACE_DETACH, tid, 0, sig as usize);
        }
        self.armed.clear();
        Ok(())
    }

    /// Makes `tid` (stopped by us) take the SIGTRAP of a breakpoint it hit if that is still
    /// queued: the stop we asked for is reported before it. Let go with it queued, the
    /// program would die of our breakpoint.
    fn discard_breakpoint_trap(&mut self, tid: i32) -> Result<()> {
        while self.threads.get(&tid)
            == Some(&State::Stopped {
                sig: 0,
                group: false,
            })
            && breakpoint_trap_queued(tid)
        {
            ptrace(libc::PTRACE_CONT, tid, 0, 0).with_context(|| format!("thread {tid}"))?;
            let status = wait_for(tid)?;
            if !libc::WIFSTOPPED(status) {
                self.handle(tid, status)?;
                return Ok(());
            }
            // A synchronous signal is taken first: the thread stops at once, without
            // running. Ours is dropped; any other is delivered when it is let go.
            let sig = libc::WSTOPSIG(status);
            let event = (status >> 16) & 0xff;
            let sig =
                if event != 0 || (sig == libc::SIGTRAP && siginfo_code(tid) == Some(TRAP_HWBKPT)) {
                    0
                } else {
                    sig
                };
            self.threads
                .insert(tid, State::Stopped { sig, group: false });
        }
        Ok(())
    }

    /// Arms execution breakpoints at `addrs` (at most [`MAX_BREAKPOINTS`]) in every thread:
    /// at once in stopped ones, at their next stop in running ones (new threads are armed at
    /// their first stop: debug registers are not inherited). Call it with every thread
    /// stopped, or a running one misses its breakpoints until something stops it.
    pub fn set_breakpoints(&mut self, addrs: &[u64]) {
        self.breakpoints = addrs.iter().copied().take(MAX_BREAKPOINTS).collect();
        self.armed.clear();
        let stopped: Vec<i32> = self
            .threads
            .iter()
            .filter(|(_, s)| **s != State::Running)
            .map(|(t, _)| *t)
            .collect();
        for tid in stopped {
            self.arm(tid);
        }
    }

    /// Writes the breakpoints into `tid`'s debug registers (it must be in a ptrace stop).
    fn arm(&mut self, tid: i32) {
        if !self.armed.insert(tid) {
            return;
        }
        // DR7: local-enable bit 2n per breakpoint; type and length 0 (execute, 1 byte).
        let mut dr7 = 0usize;
        for n in 0..MAX_BREAKPOINTS {
            let addr = self.breakpoints.get(n).copied().unwrap_or(0);
            let _ = ptrace(libc::PTRACE_POKEUSER, tid, debugreg(n), addr as usize);
            if n < self.breakpoints.len() {
                dr7 |= 1 << (2 * n);
            }
        }
        let _ = ptrace(libc::PTRACE_POKEUSER, tid, debugreg(7), dr7);
    }

    /// The breakpoint `tid` stopped at with SIGTRAP, if any (DR6 names it; cleared here).
    fn breakpoint_hit(&self, tid: i32) -> Option<usize> {
        if self.breakpoints.is_empty() {
            return None;
        }
        let dr6 = ptrace(libc::PTRACE_PEEKUSER, tid, debugreg(6), 0).ok()? as u64;
        let index = (dr6 & 0xf).trailing_zeros() as usize;
        if index >= MAX_BREAKPOINTS {
            return None;
        }
        let _ = ptrace(libc::PTRACE_POKEUSER, tid, debugreg(6), 0);
        Some(index)
    }

    /// An event stop of `tid` inside a system call, with no signal to deliver: kept stopped
    /// while [`Tracee::stop_all`] gathers the threads, continued otherwise.
    fn hold_or_continue(&mut self, tid: i32) {
        if self.stopping {
            self.in_syscall.insert(tid);
            self.threads.insert(
                tid,
                State::Stopped {
                    sig: 0,
                    group: false,
                },
            );
        } else {
            self.cont(tid, 0);
        }
    }

    fn cont(&mut self, tid: i32, sig: i32) {
        self.in_syscall.remove(&tid);
        if ptrace(libc::PTRACE_CONT, tid, 0, sig as usize).is_ok() {
            self.threads.insert(tid, State::Running);
        }
    }

    /// Waits for the next status of any thread (`block`: until there is one).
    pub fn wait(&mut self, block: bool) -> Result<Option<Event>> {
        loop {
            let mut status = 0;
            let flags = libc::__WALL | if block { 0 } else { libc::WNOHANG };
            // SAFETY: waiting for our tracees.
            let tid = unsafe { libc::waitpid(-1, &mut status, flags) };
            if tid == 0 {
                return Ok(None);
            }
            if tid < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                if e.raw_os_error() == Some(libc::ECHILD) {
                    return Ok(Some(Event::Exited(0)));
                }
                return Err(e.into());
            }
            if let Some(ev) = self.handle(tid, status)? {
                return Ok(Some(ev));
            }
            if !block {
                continue;
            }
            return Ok(None);
        }
    }

    fn handle(&mut self, tid: i32, status: i32) -> Result<Option<Event>> {
        if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
            self.threads.remove(&tid);
            self.armed.remove(&tid);
            self.exiting_threads.remove(&tid);
            self.in_syscall.remove(&tid);
            if tid == self.pid {
                let code = if libc::WIFEXITED(status) {
                    libc::WEXITSTATUS(status)
                } else {
                    128 + libc::WTERMSIG(status)
                };
                return Ok(Some(Event::Exited(code)));
            }
            return Ok(None);
        }
        if !libc::WIFSTOPPED(status) {
            return Ok(None);
        }
        let sig = libc::WSTOPSIG(status);
        let event = (status >> 16) & 0xff;
        if !self.breakpoints.is_empty() && event != libc::PTRACE_EVENT_EXEC {
            self.arm(tid); // a new thread's first stop, or any stop after set_breakpoints
        }
        let hit = if event == 0 && sig == libc::SIGTRAP {
            self.breakpoint_hit(tid)
        } else {
            None
        };
        match event {
            libc::PTRACE_EVENT_STOP => {
                let group = matches!(
                    sig,
                    libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU
                );
                if self.stopping {
                    self.threads.insert(tid, State::Stopped { sig: 0, group });
                } else if group {
                    // A job-control stop: the thread sleeps until SIGCONT (PTRACE_LISTEN).
                    let _ = ptrace(libc::PTRACE_LISTEN, tid, 0, 0);
                    self.threads.insert(tid, State::Running);
                } else {
                    self.cont(tid, 0); // a new thread's first stop
                }
            }
            libc::PTRACE_EVENT_CLONE => {
                let mut new = 0usize;
                let _ = ptrace(
                    libc::PTRACE_GETEVENTMSG,
                    tid,
                    0,
                    &mut new as *mut usize as usize,
                );
                // Its own first stop follows; until then it counts as running.
                self.threads.entry(new as i32).or_insert(State::Running);
                self.hold_or_continue(tid);
            }
            libc::PTRACE_EVENT_EXIT => {
                self.exiting_threads.insert(tid);
                self.threads.insert(
                    tid,
                    State::Stopped {
                        sig: 0,
                        group: false,
                    },
                );
                if tid == self.pid {
                    self.exiting = true;
                    return Ok(Some(Event::Exiting));
                }
                if !self.stopping {
                    self.cont(tid, 0);
                }
            }
            libc::PTRACE_EVENT_EXEC => {
                // The old program's threads and debug registers are gone.
                self.threads.retain(|&t, _| t == tid);
                self.exiting_threads.clear();
                self.in_syscall.clear();
                self.in_syscall.insert(tid);
                self.threads.insert(
                    tid,
                    State::Stopped {
                        sig: 0,
                        group: false,
                    },
                );
                self.breakpoints.clear();
                self.armed.clear();
                self.execed = true;
                return Ok(Some(Event::Exec));
            }
            0 if hit.is_some() => {
                // Our breakpoint, not the program's SIGTRAP: never delivered.
                self.threads.insert(
                    tid,
                    State::Stopped {
                        sig: 0,
                        group: false,
                    },
                );
                self.hits.push(tid);
                return Ok(Some(Event::Breakpoint {
                    tid,
                    index: hit.unwrap_or(0),
                }));
            }
            0 => {
                // Signal-delivery stop: deliver it when the thread resumes.
                self.threads
                    .insert(tid, State::Stopped { sig, group: false });
                if is_fatal(sig) {
                    self.crash = Some((tid, sig));
                    return Ok(Some(Event::Crash { tid, sig }));
                }
                if !self.stopping {
                    self.cont(tid, sig);
                }
            }
            _ => {
                self.hold_or_continue(tid);
            }
        }
        Ok(None)
    }

    /// Stops every thread (a consistent cut). Returns an event that happened meanwhile (the
    /// process exited: nothing to capture).
    pub fn stop_all(&mut self) -> Result<Option<Event>> {
        self.stopping = true;
        for (&tid, &st) in self.threads.clone().iter() {
            if st == State::Running && ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0).is_err() {
                self.threads.remove(&tid);
            }
        }
        while self.threads.values().any(|s| *s == State::Running) {
            // A crash meanwhile is captured by this very checkpoint (the thread waits at
            // its signal); its signal is delivered at resume_all.
            if let Some(Event::Exited(code)) = self.wait(true)? {
                return Ok(Some(Event::Exited(code)));
            }
        }
        Ok(None)
    }

    /// The fatal signal seen since the last call, if any (its thread waits stopped).
    pub fn take_crash(&mut self) -> Option<(i32, i32)> {
        self.crash.take()
    }

    /// Whether the process exec'd since the last call (its thread waits stopped until
    /// [`Tracee::resume_all`]).
    pub fn take_exec(&mut self) -> bool {
        std::mem::take(&mut self.execed)
    }

    /// The threads that hit a breakpoint since the last call, in order (they wait stopped).
    pub fn take_hits(&mut self) -> Vec<i32> {
        std::mem::take(&mut self.hits)
    }

    /// Whether the main thread reported its exit since the last call.
    pub fn take_exiting(&mut self) -> bool {
        std::mem::take(&mut self.exiting)
    }

    /// Resumes every thread stopped by [`Tracee::stop_all`] or an event, delivering the signals
    /// they were stopped with.
    pub fn resume_all(&mut self) {
        self.stopping = false;
        for (tid, st) in self.threads.clone() {
            if let State::Stopped { sig, group } = st {
                if group {
                    let _ = ptrace(libc::PTRACE_LISTEN, tid, 0, 0);
                    self.threads.insert(tid, State::Running);
                } else {
                    self.cont(tid, sig);
                }
            }
        }
    }

    /// A stopped thread ready to run a system call for us (see `inject.rs`): not in a
    /// job-control stop, not exiting; preferably one outside any system call and without a
    /// signal to deliver. One stopped inside a system call (at a clone or exec event) is
    /// first stepped out of it: the kernel would otherwise store that call's result over
    /// whatever the injected call is given.
    pub fn injectable_thread(&mut self) -> Result<Option<i32>> {
        let usable = |(&tid, st): (&i32, &State)| match *st {
            State::Stopped { sig, group: false } if !self.exiting_threads.contains(&tid) => Some((
                self.in_syscall.contains(&tid),
                sig != 0,
                tid != self.pid,
                tid,
            )),
            _ => None,
        };
        let Some((in_syscall, _, _, tid)) = self.threads.iter().filter_map(usable).min() else {
            return Ok(None);
        };
        if in_syscall {
            self.finish_syscall(tid)?;
        }
        Ok(Some(tid))
    }

    /// Lets `tid`, stopped at an event inside a system call, complete that call: one step
    /// reports at the call's exit, before any instruction of the program runs.
    fn finish_syscall(&mut self, tid: i32) -> Result<()> {
        ptrace(libc::PTRACE_SINGLESTEP, tid, 0, 0)
            .with_context(|| format!("thread {tid}: PTRACE_SINGLESTEP"))?;
        self.in_syscall.remove(&tid);
        let status = wait_for(tid)?;
        if !libc::WIFSTOPPED(status) {
            self.handle(tid, status)?;
            bail!("thread {tid} exited while finishing a system call");
        }
        // The step's own SIGTRAP is not the program's; any other signal is delivered later.
        let sig = libc::WSTOPSIG(status);
        let event = (status >> 16) & 0xff;
        let sig = if event == 0 && sig != libc::SIGTRAP {
            sig
        } else {
            0
        };
        self.threads
            .insert(tid, State::Stopped { sig, group: false });
        Ok(())
    }

    /// Registers of every (stopped) thread, `first` (if given) first.
    pub fn registers(&self, first: Option<i32>) -> Vec<store::ThreadState> {
        let mut out = Vec::new();
        let tids = first
            .into_iter()
            .filter(|t| self.threads.contains_key(t))
            .chain(self.threads.keys().copied().filter(|&t| Some(t) != first));
        for tid in tids {
            // SAFETY: user_regs_struct is plain old data: all-zero bytes are a valid value.
            let mut regs: libc::user_regs_struct = unsafe { std::mem::zeroed() };
            // SAFETY: as above, for user_fpregs_struct.
            let mut fp: libc::user_fpregs_struct = unsafe { std::mem::zeroed() };
            if ptrace(libc::PTRACE_GETREGS, tid, 0, &mut regs as *mut _ as usize).is_err() {
                continue;
            }
            let _ = ptrace(libc::PTRACE_GETFPREGS, tid, 0, &mut fp as *mut _ as usize);
            // SAFETY: on x86-64 user_regs_struct is exactly 27 u64 fields (216 bytes, no
            // padding), so it has the size and layout of [u64; 27].
            let regs: [u64; 27] = unsafe { std::mem::transmute(regs) };
            // SAFETY: `fp` is a live, initialised local; the slice covers exactly its bytes and
            // is copied out before `fp` goes out of scope.
            let fpregs = unsafe {
                std::slice::from_raw_parts(
                    &fp as *const _ as *const u8,
                    std::mem::size_of::<libc::user_fpregs_struct>(),
                )
            }
            .to_vec();
            out.push(store::ThreadState {
                tid: tid as u32,
                regs,
                fpregs,
            });
        }
        out
    }
}
