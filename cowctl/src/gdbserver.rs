//! `cowctl gdbserver DIR`: the GDB remote serial protocol (gdbstub) over a recording. gdb sees
//! the program stopped at one checkpoint — every thread's registers, memory as of that instant
//! (recorded pages from the store, code and read-only data from the mapped files) — and moves
//! through time with monitor commands (`monitor goto N`; the `delorean` gdb commands wrap
//! them). Writes are refused: the past is read-only.

use crate::record::{parse_maps, Mapping};
use crate::timeline::Timeline;
use gdbstub::common::{Signal, Tid};
use gdbstub::conn::{Connection, ConnectionExt};
use gdbstub::stub::{run_blocking, DisconnectReason, GdbStub, MultiThreadStopReason};
use gdbstub::target::ext::base::multithread::MultiThreadBase;
use gdbstub::target::ext::base::BaseOps;
use gdbstub::target::ext::monitor_cmd::{outputln, ConsoleOutput};
use gdbstub::target::{Target, TargetError, TargetResult};
use gdbstub_arch::x86::reg::X86_64CoreRegs;
use std::io::{BufRead, Read, Write};
use std::num::NonZeroUsize;
use store::{reg, ThreadState};

/// A timeline (a recording, or a live process's snapshots) as a gdb target, positioned at
/// one checkpoint.
pub struct PastTarget {
    rec: Box<dyn Timeline>,
    current: u64,
    threads: Vec<ThreadState>,
    maps: Vec<Mapping>,
    files: store::Files,
}

impl PastTarget {
    /// Opens `rec` at its last checkpoint.
    pub fn new(rec: Box<dyn Timeline>) -> anyhow::Result<Self> {
        let (_, last) = rec
            .range()
            .ok_or_else(|| anyhow::anyhow!("the recording has no checkpoint"))?;
        let mut t = PastTarget {
            rec,
            current: 0,
            threads: Vec::new(),
            maps: Vec::new(),
            files: Default::default(),
        };
        t.goto(last)?;
        Ok(t)
    }

    fn goto(&mut self, number: u64) -> anyhow::Result<()> {
        // Checked first: a missing checkpoint leaves the position unchanged.
        self.rec.describe(number)?;
        self.threads = self.rec.threads(number)?;
        self.maps = parse_maps(&self.rec.maps(number)?);
        self.current = number;
        Ok(())
    }

    fn thread(&self, tid: Tid) -> Option<&ThreadState> {
        self.threads.iter().find(|t| t.tid as usize == tid.get())
    }

    /// Reads memory as of the current checkpoint; returns how many leading bytes exist.
    fn read_memory(&mut self, addr: u64, data: &mut [u8]) -> usize {
        let (rec, n) = (&self.rec, self.current);
        store::read_through(addr, data, &self.maps, &mut self.files, |p| rec.page(n, p))
            .unwrap_or(0) // a corrupt page is never served
    }

    /// Handles one monitor command; returns its output lines.
    fn monitor(&mut self, cmd: &str) -> Vec<String> {
        let mut words = cmd.split_whitespace();
        let verb = words.next().unwrap_or("");
        let arg = |w: Option<&str>| -> Option<u64> {
            let w = w?;
            match w.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16).ok(),
                None => w.parse().ok(),
            }
        };
        match verb {
            "goto" => match arg(words.next()) {
                Some(n) => match self.goto(n) {
                    Ok(()) => vec![self.describe(n)],
                    Err(e) => vec![format!("error: {e}")],
                },
                None => vec!["error: usage: goto N".into()],
            },
            "current" => vec![self.current.to_string()],
            "range" => match self.rec.range() {
                Some((a, b)) => vec![format!("{a} {b}")],
                None => vec!["0 0".into()],
            },
            "list" => {
                let (first, last) = self.rec.range().unwrap_or((1, 0));
                let from = arg(words.next()).unwrap_or(first).max(first);
                let to = arg(words.next()).unwrap_or(last).min(last);
                // Numbers without a checkpoint (a live process's dropped snapshots) are skipped.
                (from..=to).filter_map(|n| self.rec.describe(n).ok()).collect()
            }
            "when" => match (arg(words.next()), arg(words.next())) {
                (Some(addr), Some(len)) => match self.rec.when(addr, len) {
                    Ok(v) => vec![v.iter().map(u64::to_string).collect::<Vec<_>>().join(" ")],
                    Err(e) => vec![format!("error: {e}")],
                },
                _ => vec!["error: usage: when ADDR LEN".into()],
            },
            _ => vec![format!(
                "error: unknown command {verb:?} (goto N, current, range, list [A B], when ADDR LEN)"
            )],
        }
    }

    fn describe(&self, n: u64) -> String {
        self.rec
            .describe(n)
            .unwrap_or_else(|e| format!("error: {e:#}"))
    }
}

/// Errors the target reports to gdb.
#[derive(Debug)]
pub enum PastError {}

impl Target for PastTarget {
    type Arch = gdbstub_arch::x86::X86_64_SSE;
    type Error = PastError;

    fn base_ops(&mut self) -> BaseOps<'_, Self::Arch, Self::Error> {
        BaseOps::MultiThread(self)
    }

    // No breakpoint is ever hit: a recording does not run.
    fn guard_rail_implicit_sw_breakpoints(&self) -> bool {
        true
    }

    fn support_monitor_cmd(
        &mut self,
    ) -> Option<gdbstub::target::ext::monitor_cmd::MonitorCmdOps<'_, Self>> {
        Some(self)
    }

    fn support_auxv(&mut self) -> Option<gdbstub::target::ext::auxv::AuxvOps<'_, Self>> {
        Some(self)
    }

    fn support_exec_file(
        &mut self,
    ) -> Option<gdbstub::target::ext::exec_file::ExecFileOps<'_, Self>> {
        Some(self)
    }
}

impl MultiThreadBase for PastTarget {
    fn read_registers(&mut self, regs: &mut X86_64CoreRegs, tid: Tid) -> TargetResult<(), Self> {
        let t = self.thread(tid).ok_or(TargetError::NonFatal)?;
        let r = &t.regs;
        regs.regs = [
            r[reg::RAX],
            r[reg::RBX],
            r[reg::RCX],
            r[reg::RDX],
            r[reg::RSI],
            r[reg::RDI],
            r[reg::RBP],
            r[reg::RSP],
            r[reg::R8],
            r[reg::R9],
            r[reg::R10],
            r[reg::R11],
            r[reg::R12],
            r[reg::R13],
            r[reg::R14],
            r[reg::R15],
        ];
        regs.rip = r[reg::RIP];
        regs.eflags = r[reg::EFLAGS] as u32;
        regs.segments.cs = r[reg::CS] as u32;
        regs.segments.ss = r[reg::SS] as u32;
        regs.segments.ds = r[reg::DS] as u32;
        regs.segments.es = r[reg::ES] as u32;
        regs.segments.fs = r[reg::FS] as u32;
        regs.segments.gs = r[reg::GS] as u32;
        // The FXSAVE area: control/status/tag words, x87 registers at 32, XMM at 160.
        let fp = &t.fpregs;
        if fp.len() >= 416 {
            let u16_at = |o: usize| u16::from_le_bytes([fp[o], fp[o + 1]]) as u32;
            let u32_at = |o: usize| u32::from_le_bytes(fp[o..o + 4].try_into().unwrap());
            regs.fpu.fctrl = u16_at(0);
            regs.fpu.fstat = u16_at(2);
            regs.fpu.ftag = u16_at(4);
            regs.fpu.fop = u16_at(6);
            regs.fpu.fioff = u32_at(8);
            regs.fpu.fooff = u32_at(16);
            regs.mxcsr = u32_at(24);
            for (i, st) in regs.st.iter_mut().enumerate() {
                st.copy_from_slice(&fp[32 + 16 * i..32 + 16 * i + 10]);
            }
            for (i, x) in regs.xmm.iter_mut().enumerate() {
                *x = u128::from_le_bytes(fp[160 + 16 * i..176 + 16 * i].try_into().unwrap());
            }
        }
        Ok(())
    }

    fn write_registers(&mut self, _: &X86_64CoreRegs, _: Tid) -> TargetResult<(), Self> {
        Err(TargetError::NonFatal) // the past is read-only
    }

    fn read_addrs(&mut self, start: u64, data: &mut [u8], _tid: Tid) -> TargetResult<usize, Self> {
        match self.read_memory(start, data) {
            0 => Err(TargetError::Errno(14)), // EFAULT
            n => Ok(n),
        }
    }

    fn write_addrs(&mut self, _: u64, _: &[u8], _: Tid) -> TargetResult<(), Self> {
        Err(TargetError::Errno(30)) // EROFS: the past is read-only
    }

    fn list_active_threads(&mut self, active: &mut dyn FnMut(Tid)) -> Result<(), PastError> {
        for t in &self.threads {
            if let Some(tid) = NonZeroUsize::new(t.tid as usize) {
                active(tid);
            }
        }
        Ok(())
    }
}

impl gdbstub::target::ext::monitor_cmd::MonitorCmd for PastTarget {
    fn handle_monitor_cmd(
        &mut self,
        cmd: &[u8],
        mut out: ConsoleOutput<'_>,
    ) -> Result<(), PastError> {
        for line in self.monitor(&String::from_utf8_lossy(cmd)) {
            outputln!(out, "{line}");
        }
        Ok(())
    }
}

/// Copies `offset..` of `data` into `buf` (the qXfer convention).
fn xfer(data: &[u8], offset: u64, length: usize, buf: &mut [u8]) -> usize {
    let start = (offset as usize).min(data.len());
    let n = (data.len() - start).min(length).min(buf.len());
    buf[..n].copy_from_slice(&data[start..start + n]);
    n
}

impl gdbstub::target::ext::auxv::Auxv for PastTarget {
    fn get_auxv(&self, offset: u64, length: usize, buf: &mut [u8]) -> TargetResult<usize, Self> {
        Ok(xfer(&self.rec.auxv(), offset, length, buf))
    }
}

impl gdbstub::target::ext::exec_file::ExecFile for PastTarget {
    fn get_exec_file(
        &self,
        _pid: Option<gdbstub::common::Pid>,
        offset: u64,
        length: usize,
        buf: &mut [u8],
    ) -> TargetResult<usize, Self> {
        Ok(xfer(self.rec.exe().as_bytes(), offset, length, buf))
    }
}

/// gdb over stdin/stdout (`target remote | cowctl gdbserver DIR --stdio`).
pub struct Stdio {
    input: std::io::BufReader<std::io::Stdin>,
    output: std::io::Stdout,
}

impl Connection for Stdio {
    type Error = std::io::Error;
    fn write(&mut self, byte: u8) -> std::io::Result<()> {
        self.output.write_all(&[byte])
    }
    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.output.write_all(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.output.flush()
    }
}

impl ConnectionExt for Stdio {
    fn read(&mut self) -> std::io::Result<u8> {
        let mut b = [0u8];
        self.input.read_exact(&mut b)?;
        Ok(b[0])
    }
    fn peek(&mut self) -> std::io::Result<Option<u8>> {
        Ok(self.input.fill_buf()?.first().copied())
    }
}

/// The event loop: a recording never runs, so only gdb's packets arrive.
enum PastLoop {}

impl run_blocking::BlockingEventLoop for PastLoop {
    type Target = PastTarget;
    type Connection = Box<dyn ConnectionExt<Error = std::io::Error>>;
    type StopReason = MultiThreadStopReason<u64>;

    fn wait_for_stop_reason(
        _target: &mut PastTarget,
        conn: &mut Self::Connection,
    ) -> Result<
        run_blocking::Event<Self::StopReason>,
        run_blocking::WaitForStopReasonError<PastError, std::io::Error>,
    > {
        let byte = conn
            .read()
            .map_err(run_blocking::WaitForStopReasonError::Connection)?;
        Ok(run_blocking::Event::IncomingData(byte))
    }

    fn on_interrupt(_target: &mut PastTarget) -> Result<Option<Self::StopReason>, PastError> {
        Ok(Some(MultiThreadStopReason::Signal(Signal::SIGINT)))
    }
}

/// Serves `dir` to one gdb: over stdin/stdout, or on `listen` (host:port).
pub fn serve(source: &crate::timeline::Source, listen: Option<&str>) -> anyhow::Result<()> {
    let mut target = PastTarget::new(source.open()?)?;
    let conn: Box<dyn ConnectionExt<Error = std::io::Error>> = match listen {
        Some(addr) => {
            let l = std::net::TcpListener::bind(addr)?;
            eprintln!("cowctl gdbserver: listening on {}", l.local_addr()?);
            let (s, _) = l.accept()?;
            Box::new(s)
        }
        None => Box::new(Stdio {
            input: std::io::BufReader::new(std::io::stdin()),
            output: std::io::stdout(),
        }),
    };
    match GdbStub::new(conn).run_blocking::<PastLoop>(&mut target) {
        Ok(DisconnectReason::Disconnect) | Ok(DisconnectReason::Kill) => Ok(()),
        Ok(other) => anyhow::bail!("gdb session ended: {other:?}"),
        Err(e) => anyhow::bail!("gdb session failed: {e:?}"),
    }
}
