//! Builds the kernel programs (ebpf/) with nightly + bpf-linker through aya-build and leaves
//! the object in OUT_DIR for `include_bytes_aligned!`.

fn main() -> anyhow::Result<()> {
    if which::which("bpf-linker").is_err() {
        anyhow::bail!(
            "bpf-linker is not on PATH: run `cargo xtask bootstrap` (DESIGN.md §6 has the recipe)"
        );
    }
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "switchyard-ebpf",
            root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf"),
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
}
