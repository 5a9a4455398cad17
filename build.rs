//! Stamps the binary with the git commit it was built from (`waymark --version`).
//! Outside a git checkout (a source tarball) the commit reads "unknown".

fn main() {
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=WAYMARK_GIT_COMMIT={commit}");
    // A new commit changes HEAD (or the branch ref it points to).
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
    println!("cargo:rerun-if-env-changed=WAYMARK_GIT_COMMIT");
}
