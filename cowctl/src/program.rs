//! What `cowctl run` is about to start: can `LD_PRELOAD` reach it at all?
//!
//! The preload covers a program only if the dynamic loader loads it: a statically linked
//! executable has no loader, and a set-user-ID, set-group-ID or file-capability program runs in
//! secure mode (`AT_SECURE`), where the loader ignores a preload outside the system paths.

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Why a program cannot be covered, if it cannot.
#[derive(Debug, PartialEq, Eq)]
pub enum Uncoverable {
    /// A statically linked executable: no dynamic loader, so no preload.
    Static,
    /// Runs in secure mode (set-user-ID, set-group-ID or file capabilities).
    Secure(&'static str),
}

impl std::fmt::Display for Uncoverable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Uncoverable::Static => f.write_str(
                "is statically linked: there is no dynamic loader to load libcow_preload",
            ),
            Uncoverable::Secure(why) => write!(
                f,
                "is {why}: the dynamic loader runs it in secure mode and ignores LD_PRELOAD"
            ),
        }
    }
}

/// The executable `name` resolves to, as `execvp` would find it.
pub fn resolve(name: &OsStr) -> Option<PathBuf> {
    let as_path = Path::new(name);
    if as_path.as_os_str().as_encoded_bytes().contains(&b'/') {
        return Some(as_path.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether the program at `path` cannot be covered by the preload (`None`: it can, or it is not
/// an ELF executable we can judge, such as a script).
pub fn uncoverable(path: &Path) -> Option<Uncoverable> {
    let meta = std::fs::metadata(path).ok()?;
    let mode = meta.permissions().mode();
    if mode & 0o4000 != 0 {
        return Some(Uncoverable::Secure("set-user-ID"));
    }
    if mode & 0o2010 == 0o2010 {
        return Some(Uncoverable::Secure("set-group-ID"));
    }
    if has_file_capabilities(path) {
        return Some(Uncoverable::Secure("given file capabilities"));
    }
    // The program headers follow the ELF header: the file's start is enough (a whole
    // executable is megabytes, read over 9p in a guest at every call).
    let mut head = Vec::new();
    let read = std::fs::File::open(path).and_then(|f| {
        use std::io::Read;
        f.take(64 * 1024).read_to_end(&mut head)
    });
    match read.ok().and_then(|_| has_interpreter(&head)) {
        Some(false) => Some(Uncoverable::Static),
        _ => None,
    }
}

fn has_file_capabilities(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: a NUL-terminated path and attribute name; a null buffer of size 0 only asks
    // for the attribute's size.
    let n = unsafe {
        libc::getxattr(
            c.as_ptr(),
            c"security.capability".as_ptr(),
            std::ptr::null_mut(),
            0,
        )
    };
    n > 0
}

/// Whether a 64-bit little-endian ELF executable names a program interpreter (`PT_INTERP`,
/// the dynamic loader); `None` when `elf` is not one.
pub fn has_interpreter(elf: &[u8]) -> Option<bool> {
    const PT_INTERP: u32 = 3;
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    };
    // ELF magic, ELFCLASS64, ELFDATA2LSB.
    if elf.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let phoff = u64_at(0x20)? as usize;
    let phentsize = u16_at(0x36)? as usize;
    let phnum = u16_at(0x38)? as usize;
    Some((0..phnum).any(|i| u32_at(phoff + i * phentsize) == Some(PT_INTERP)))
}

/// Whether `exe` was linked by `cowcc`: it imports `__cow_lmc_register` (its objects register
/// with libcow's lmc runtime at load time).
pub fn compiled_with_cowcc(exe: &Path) -> bool {
    use object::{Object, ObjectSymbol};
    let Ok(data) = std::fs::read(exe) else {
        return false;
    };
    let Ok(file) = object::File::parse(&*data) else {
        return false;
    };
    file.dynamic_symbols()
        .chain(file.symbols())
        .any(|s| s.name() == Ok("__cow_lmc_register"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamic_executable_has_an_interpreter() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(has_interpreter(&me), Some(true));
        assert_eq!(uncoverable(&std::env::current_exe().unwrap()), None);
    }

    #[test]
    fn scripts_and_garbage_are_not_judged() {
        assert_eq!(has_interpreter(b"#!/bin/sh\necho hi\n"), None);
        assert_eq!(has_interpreter(b"\x7fELF\x02\x01"), None);
    }

    #[test]
    fn busybox_is_static() {
        // Debian's busybox (the guests' init) is statically linked.
        if let Some(bb) = resolve(OsStr::new("busybox")) {
            assert_eq!(uncoverable(&bb), Some(Uncoverable::Static));
        }
    }

    #[test]
    fn names_resolve_through_path() {
        let sh = resolve(OsStr::new("sh")).expect("sh on PATH");
        assert!(sh.is_absolute());
        assert_eq!(resolve(OsStr::new("./x")), Some(PathBuf::from("./x")));
    }
}
