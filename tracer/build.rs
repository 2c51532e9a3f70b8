//! Builds the eBPF program (`tracer-ebpf`) for `bpfel-unknown-none` with the nightly
//! toolchain and bpf-linker; `src/source/kernel.rs` embeds the object from `$OUT_DIR`.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == "tracer-ebpf")
        .ok_or_else(|| anyhow!("tracer-ebpf package not found"))?;
    let common = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == "tracer-common")
        .ok_or_else(|| anyhow!("tracer-common package not found"))?;
    // aya-build watches the eBPF crate's directory; the ABI crate it uses must trigger a
    // rebuild too.
    if let Some(dir) = common.manifest_path.parent() {
        println!("cargo:rerun-if-changed={dir}");
    }
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("tracer-ebpf has no directory"))?;
    aya_build::build_ebpf(
        [Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::Nightly,
    )
}
