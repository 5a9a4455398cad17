//! Stamps the binary with the git commit it was built from (`waymark --version`).
//! WAYMARK_GIT_COMMIT, when set, names it (a build without .git, such as the
//! Docker build context, passes it in); outside a git checkout without it the
//! commit reads "unknown".

fn main() {
    let commit = std::env::var("WAYMARK_GIT_COMMIT")
        .ok()
        .map(|c| c.trim().to_string())
        .filter(|c| !c.is_empty())
        .or_else(git_head)
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=WAYMARK_GIT_COMMIT={commit}");
    // A new commit changes HEAD (or the branch ref it points to).
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
    println!("cargo:rerun-if-env-changed=WAYMARK_GIT_COMMIT");
}

/// The checkout's HEAD, abbreviated; `None` outside a git checkout.
fn git_head() -> Option<String> {
    let output = std::process::Command::new("git").args(["rev-parse", "--short=12", "HEAD"]).output().ok()?;
    let commit = String::from_utf8(output.stdout).ok()?.trim().to_string();
    (output.status.success() && !commit.is_empty()).then_some(commit)
}
