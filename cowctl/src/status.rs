//! `cowctl status`: is cow.ko loaded, which ABI does it speak, which kernel features exist here.

use cow::probe::{kernel_features, KernelFeatures, Probe};
use serde::Serialize;

/// What `cowctl status` reports.
#[derive(Serialize)]
struct Status {
    module: ModuleStatus,
    kernel: KernelFeatures,
    auto_backend: AutoBackend,
}

/// What `cow_init("auto")` would pick here, and why.
#[derive(Serialize)]
struct AutoBackend {
    name: &'static str,
    reason: String,
}

#[derive(Serialize)]
struct ModuleStatus {
    /// cow is listed in /proc/modules.
    loaded: bool,
    device: &'static str,
    /// The module's ABI version, when /dev/cow could be opened and asked.
    abi_version: Option<u32>,
    library_abi_version: u32,
    page_size: Option<u32>,
    /// Why the module could not be used, if it could not.
    error: Option<String>,
}

fn module_listed() -> bool {
    std::fs::read_to_string("/proc/modules")
        .map(|m| m.lines().any(|l| l.split(' ').next() == Some("cow")))
        .unwrap_or(false)
}

fn module_status() -> ModuleStatus {
    let mut s = ModuleStatus {
        loaded: module_listed(),
        device: cow::COW_DEVICE_PATH,
        abi_version: None,
        library_abi_version: cow::abi::COW_ABI_VERSION,
        page_size: None,
        error: None,
    };
    match cow::Cow::open() {
        Ok(dev) => {
            s.abi_version = Some(dev.abi_version());
            s.page_size = Some(dev.page_size());
        }
        Err(e) => s.error = Some(e.to_string()),
    }
    s
}

fn yes_no(p: &Probe) -> String {
    format!("{:<4} {}", if p.available { "yes" } else { "no" }, p.detail)
}

/// Runs `cowctl status`.
pub fn run(json: bool) -> anyhow::Result<()> {
    let choice = cow::backend::choose_auto();
    let status = Status {
        module: module_status(),
        kernel: kernel_features(),
        auto_backend: AutoBackend {
            name: choice.name,
            reason: choice.reason,
        },
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    let m = &status.module;
    match (m.abi_version, &m.error) {
        (Some(v), _) => println!(
            "cow.ko          loaded, {} speaks ABI version {v} (libcow: {}), page size {}",
            m.device,
            m.library_abi_version,
            m.page_size.unwrap_or(0)
        ),
        (None, Some(e)) => println!("cow.ko          not usable: {e}"),
        (None, None) => println!("cow.ko          not loaded"),
    }
    let k = &status.kernel;
    println!("kernel          {}", k.kernel_release);
    println!("uffd WP_ASYNC   {}", yes_no(&k.uffd_wp_async));
    println!("PAGEMAP_SCAN    {}", yes_no(&k.pagemap_scan));
    println!("soft-dirty      {}", yes_no(&k.soft_dirty));
    println!(
        "auto backend    {} ({})",
        status.auto_backend.name, status.auto_backend.reason
    );
    Ok(())
}
