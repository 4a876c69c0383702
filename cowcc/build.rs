//! Builds the libc wrappers cowcc links into programs (`src/wrappers.c`).
fn main() {
    println!("cargo:rerun-if-changed=src/wrappers.c");
    // The region size libcow and the pass are built with (see libcow's lmc.rs).
    println!("cargo:rerun-if-env-changed=COW_LMC_REGION_SHIFT");
    let shift = std::env::var("COW_LMC_REGION_SHIFT").unwrap_or_else(|_| "7".into());
    cc::Build::new()
        .define("REGION_SHIFT", shift.as_str())
        .file("src/wrappers.c")
        .pic(true)
        .opt_level(2)
        .warnings(true)
        .extra_warnings(true)
        .warnings_into_errors(true)
        .compile("cow_lmc_wrappers");
}
