//! Function addresses for `cowctl record --at SYMBOL`: looked up in the program's own ELF
//! symbol tables, then relocated by where the kernel loaded it (PIE executables move).

use anyhow::{bail, Context, Result};
use object::{Object, ObjectSegment, ObjectSymbol, SymbolKind};
use std::path::Path;

/// A function of the program to checkpoint at.
#[derive(Clone, Debug)]
pub struct Function {
    /// Its name, as given.
    pub name: String,
    /// Its address in the file (link time).
    pub link_addr: u64,
}

/// Finds `names` among the functions defined by the executable `exe`.
pub fn functions(exe: &Path, names: &[String]) -> Result<Vec<Function>> {
    let data = std::fs::read(exe).with_context(|| format!("cannot read {}", exe.display()))?;
    let file = object::File::parse(&*data)
        .with_context(|| format!("{} is not an ELF file", exe.display()))?;
    names
        .iter()
        .map(|name| {
            let found = file.symbols().chain(file.dynamic_symbols()).find(|s| {
                s.kind() == SymbolKind::Text
                    && s.is_definition()
                    && s.name().ok() == Some(name.as_str())
            });
            match found {
                Some(s) => Ok(Function {
                    name: name.clone(),
                    link_addr: s.address(),
                }),
                None => bail!(
                    "--at {name}: no function {name} in {} (--at takes functions defined by the \
                     program itself, not by its shared libraries; a stripped program has none)",
                    exe.display()
                ),
            }
        })
        .collect()
}

/// How far the kernel moved `exe` in process `pid`: 0 for a fixed-address executable, the
/// load base for a PIE. Read from `/proc/PID/maps` once the program has exec'd.
pub fn load_bias(pid: i32, exe: &Path) -> Result<u64> {
    let data = std::fs::read(exe).with_context(|| format!("cannot read {}", exe.display()))?;
    let file = object::File::parse(&*data)?;
    if file.kind() != object::ObjectKind::Dynamic {
        return Ok(0);
    }
    let first_vaddr = file.segments().map(|s| s.address()).min().unwrap_or(0) & !0xfff;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let path = exe.display().to_string();
    let base = crate::record::parse_maps(&maps)
        .into_iter()
        .filter(|m| m.path == path)
        .map(|m| m.start - m.offset)
        .min()
        .with_context(|| format!("{path} is not mapped in process {pid}"))?;
    Ok(base - first_vaddr)
}
