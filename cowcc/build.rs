//! Builds the libc wrappers cowcc links into programs (`src/wrappers.c`).
fn main() {
    println!("cargo:rerun-if-changed=src/wrappers.c");
    cc::Build::new()
        .file("src/wrappers.c")
        .pic(true)
        .opt_level(2)
        .warnings(true)
        .extra_warnings(true)
        .warnings_into_errors(true)
        .compile("cow_lmc_wrappers");
}
