//! Build script: records the git commit the binary is built from, for `kr-tunneld --version`
//! (SPEC O-1). Outside a git checkout (a source tarball) the commit is "unknown", or whatever
//! `KR_TUNNELD_COMMIT` says in the build environment.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=KR_TUNNELD_COMMIT");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs");
    let commit = std::env::var("KR_TUNNELD_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| {
            let out = Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()?;
            let c = String::from_utf8(out.stdout).ok()?.trim().to_string();
            (out.status.success() && !c.is_empty()).then_some(c)
        });
    println!(
        "cargo:rustc-env=KR_TUNNELD_COMMIT={}",
        commit.as_deref().unwrap_or("unknown")
    );
}
