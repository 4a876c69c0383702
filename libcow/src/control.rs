//! Live control of a process whose snapshots libcow keeps in-process (the uffd and mprotect
//! backends under `cowctl run`): `cowctl snapshot|restore|drop|list|stats PID` cannot take a
//! descriptor from such a process as they do with cow.ko, so libcow answers them itself, from
//! a thread listening on a Unix socket in the abstract namespace, `@delorean-cow/PID`.
//!
//! One request per connection, one line each way:
//! `snapshot` → `ok ID`; `restore ID`, `drop ID` → `ok`; `list` → `ok ID ID …`;
//! `backend` → `ok NAME`; `book` → `ok START END` (libcow's own bookkeeping range, which a
//! recorder leaves out);
//! `stats` → `ok snapshots=N write_faults=N pages_saved=N bytes_held=N snapshot_ns=N
//! restore_ns=N` (and, under `--recover`, `recoveries=N not_recovered=N iterations=N
//! checkpoints=N taken_while_idle=N`); any
//! failure → `err ERRNO`.
//!
//! Only the process's own user (or root) is answered (`SO_PEERCRED`). The thread serves
//! requests through the C API's paths (serialised with the program's own snapshots, restores
//! and drops, and with the checkpointer) and formats replies in stack buffers: it never
//! allocates in the program's heap, which a restore would rewind under it.

use crate::error::{Error, Result};
use crate::fds::KeptFd;
use std::io::Write as _;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The longest request or reply line.
const LINE: usize = 4096;

/// The socket address of process `pid`'s control thread.
fn address(pid: i32) -> (libc::sockaddr_un, libc::socklen_t) {
    // SAFETY: sockaddr_un is plain old data.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let mut name = [0u8; 48];
    let n = {
        let mut w = &mut name[1..]; // sun_path[0] = 0: the abstract namespace
        let _ = write!(w, "delorean-cow/{pid}");
        47 - w.len()
    };
    for (dst, &src) in addr.sun_path.iter_mut().zip(&name[..1 + n]) {
        *dst = src as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + 1 + n;
    (addr, len as libc::socklen_t)
}

fn socket() -> Result<KeptFd> {
    // SAFETY: socket takes integers and returns a new descriptor or -1.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(Error::last_os("socket(AF_UNIX)"));
    }
    // SAFETY: a descriptor the kernel just gave us.
    Ok(KeptFd::new(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Starts the control thread of this process (after `cow_init`). The thread lives as long as
/// the process.
pub fn serve() -> Result<()> {
    let listener = socket()?;
    // SAFETY: getpid has no preconditions.
    let (addr, len) = address(unsafe { libc::getpid() });
    // SAFETY: binding our socket to a valid address of `len` bytes.
    if unsafe {
        libc::bind(
            listener.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    } != 0
    {
        return Err(Error::last_os("bind @delorean-cow/PID"));
    }
    // SAFETY: listening on our socket.
    if unsafe { libc::listen(listener.as_raw_fd(), 8) } != 0 {
        return Err(Error::last_os("listen"));
    }
    static LISTENING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    std::thread::Builder::new()
        .name("libcow-control".into())
        .spawn(move || {
            crate::world::block_process_signals();
            loop {
                LISTENING.store(true, std::sync::atomic::Ordering::Release);
                // Waiting for a request writes nothing: snapshots need not signal us.
                let wait = crate::idle::begin();
                // SAFETY: accepting on our listening socket; no peer address wanted.
                let fd = unsafe {
                    libc::accept4(
                        listener.as_raw_fd(),
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        libc::SOCK_CLOEXEC,
                    )
                };
                crate::idle::end(wait);
                if fd >= 0 {
                    // SAFETY: a descriptor the kernel just gave us.
                    answer(KeptFd::new(unsafe { OwnedFd::from_raw_fd(fd) }));
                }
            }
        })
        .map_err(|e| Error::Os {
            op: "spawn the control thread",
            errno: e.raw_os_error().unwrap_or(libc::EAGAIN),
        })?;
    // Return once the thread runs its loop: what its start-up allocates is then in the
    // program's heap before any snapshot, so no restore can take it away.
    while !LISTENING.load(std::sync::atomic::Ordering::Acquire) {
        std::thread::yield_now();
    }
    Ok(())
}

/// Whether the peer of `conn` is our user or root.
fn peer_allowed(conn: &KeptFd) -> bool {
    // SAFETY: ucred is plain old data.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: reading SO_PEERCRED into a ucred of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    // SAFETY: geteuid has no preconditions.
    rc == 0 && (cred.uid == 0 || cred.uid == unsafe { libc::geteuid() })
}

/// Reads one request from `conn`, does it, writes the reply.
fn answer(conn: KeptFd) {
    let mut req = [0u8; 128];
    let mut reply = [0u8; LINE];
    let mut out = &mut reply[..];
    if !peer_allowed(&conn) {
        let _ = writeln!(out, "err {}", libc::EPERM);
    } else {
        // SAFETY: reading into our stack buffer.
        let n = unsafe { libc::read(conn.as_raw_fd(), req.as_mut_ptr().cast(), req.len()) };
        let text = std::str::from_utf8(&req[..n.max(0) as usize]).unwrap_or("");
        let mut words = text.split_whitespace();
        let id = |w: Option<&str>| w.and_then(|w| w.parse::<i64>().ok()).unwrap_or(0);
        let rc = match words.next() {
            Some("snapshot") => {
                let id = crate::ffi::cow_snapshot();
                if id > 0 {
                    let _ = writeln!(out, "ok {id}");
                }
                id.min(0) as i32
            }
            Some("restore") => crate::ffi::cow_restore(id(words.next())),
            Some("drop") => crate::ffi::cow_drop(id(words.next())),
            // libcow's own bookkeeping memory: a recorder leaves it out (not the program's).
            Some("book") => match crate::book::try_book() {
                Ok(book) => {
                    let (start, end) = book.range();
                    let _ = writeln!(out, "ok {start:#x} {end:#x}");
                    0
                }
                Err(e) => -e.errno(),
            },
            Some("backend") => crate::ffi::with_ops(|b| {
                let _ = writeln!(out, "ok {}", b.name());
                Ok(())
            }),
            Some("list") => crate::ffi::with_ops(|b| {
                let ids = b.list()?; // freed before the lock is released
                let _ = write!(out, "ok");
                for i in ids {
                    let _ = write!(out, " {i}");
                }
                let _ = writeln!(out);
                Ok(())
            }),
            Some("stats") => crate::ffi::with_ops(|b| {
                let s = b.stats();
                let _ = write!(
                    out,
                    "ok snapshots={} write_faults={} pages_saved={} bytes_held={} \
                     snapshot_ns={} restore_ns={}",
                    s.snapshots,
                    s.write_faults,
                    s.pages_saved,
                    s.bytes_held,
                    s.snapshot_ns,
                    s.restore_ns
                );
                if let Some(t) = crate::recovery::totals() {
                    let _ = write!(
                        out,
                        " recoveries={} not_recovered={} iterations={} checkpoints={} \
                         taken_while_idle={}",
                        t.recoveries,
                        t.not_recovered,
                        t.iterations,
                        t.checkpoints,
                        t.taken_while_idle
                    );
                }
                let _ = writeln!(out);
                Ok(())
            }),
            _ => -libc::EINVAL,
        };
        if rc < 0 {
            out = &mut reply[..];
            let _ = writeln!(out, "err {}", -rc);
        } else if out.len() == LINE {
            let _ = writeln!(out, "ok");
        }
    }
    let used = LINE - out.len();
    // SAFETY: writing our stack buffer's filled part.
    unsafe { libc::write(conn.as_raw_fd(), reply.as_ptr().cast(), used) };
}

/// Sends `request` to process `pid`'s control thread; returns the reply after `ok`.
/// `ECONNREFUSED` (no such socket): the process has no in-process libcow to answer.
pub fn request(pid: i32, request: &str) -> Result<String> {
    let conn = socket()?;
    let (addr, len) = address(pid);
    // SAFETY: connecting our socket to a valid address of `len` bytes.
    if unsafe {
        libc::connect(
            conn.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    } != 0
    {
        return Err(Error::last_os("connect to @delorean-cow/PID"));
    }
    let line = format!("{request}\n");
    // SAFETY: writing our buffer.
    if unsafe { libc::write(conn.as_raw_fd(), line.as_ptr().cast(), line.len()) } < 0 {
        return Err(Error::last_os("send the request"));
    }
    let mut reply = Vec::new();
    let mut buf = [0u8; LINE];
    loop {
        // SAFETY: reading into our buffer.
        let n = unsafe { libc::read(conn.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break;
        }
        reply.extend_from_slice(&buf[..n as usize]);
    }
    let reply = String::from_utf8_lossy(&reply).trim().to_string();
    if let Some(rest) = reply.strip_prefix("ok") {
        return Ok(rest.trim().to_string());
    }
    let errno = reply
        .strip_prefix("err ")
        .and_then(|e| e.parse().ok())
        .unwrap_or(libc::EPROTO);
    Err(Error::Os {
        op: "control request",
        errno,
    })
}
