//! Embeds every fixture body (`fixtures/<carrier>/*.json`) and every declared
//! carrier mapping (`fixtures/declared/*.toml`) in the fuzz targets, so that a
//! target needs no files at run time, whatever directory cargo fuzz runs it from,
//! and a new fixture becomes a new starting point without editing the target.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn files(dir: &Path, extension: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    out.retain(|p| p.extension().is_some_and(|e| e == extension));
    out.sort();
    out
}

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let fixtures = manifest.join("..").join("fixtures");
    println!("cargo:rerun-if-changed={}", fixtures.display());
    let mut carriers: Vec<PathBuf> = std::fs::read_dir(&fixtures)
        .expect("fixtures/ next to fuzz/")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    carriers.sort();

    let mut bodies = String::from("&[\n");
    let mut mappings = String::from("&[\n");
    for dir in carriers {
        println!("cargo:rerun-if-changed={}", dir.display());
        let name = dir.file_name().and_then(|n| n.to_str()).expect("UTF-8 directory name").to_string();
        if name == "declared" {
            for mapping in files(&dir, "toml") {
                let _ = writeln!(mappings, "    include_str!({:?}),", mapping.display().to_string());
            }
            continue;
        }
        for body in files(&dir, "json") {
            // Bytes, not str: some bad fixtures are not UTF-8 on purpose.
            let _ = writeln!(bodies, "    ({name:?}, include_bytes!({:?})),", body.display().to_string());
        }
    }
    bodies.push(']');
    mappings.push(']');
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    std::fs::write(out.join("fixture_bodies.rs"), bodies).expect("write OUT_DIR/fixture_bodies.rs");
    std::fs::write(out.join("declared_mappings.rs"), mappings).expect("write OUT_DIR/declared_mappings.rs");
}
