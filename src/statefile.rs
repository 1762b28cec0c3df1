//! Files in the state directory and the metrics file (SPEC S-1, S-6).
//!
//! Shell module. The records in `--state-dir` decide what later runs delete, and the metrics file
//! may live in a directory others can write (a textfile collector's), so:
//!
//! * [`write_atomic`] writes to a temporary file with an unpredictable name, created exclusively
//!   (`O_CREAT|O_EXCL|O_NOFOLLOW`) in the target's directory, fsyncs it, renames it over the
//!   target and fsyncs the directory. A symlink planted at any name is never followed: an
//!   existing link at the target is replaced by the rename, never written through.
//! * [`check_state_dir`] refuses a state directory that is not owned by root or that group or
//!   others can write: whoever can write the records decides what the daemon deletes.

use std::path::Path;

/// Write `data` to `path` atomically (SPEC S-6): a fresh temporary file in the same directory,
/// created exclusively and without following links, mode 0644 (less the umask), fsynced, renamed
/// over `path`; then the directory is fsynced so the rename survives a crash. The directory is
/// created when missing. On failure the temporary file is removed and `path` is unchanged.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    std::fs::create_dir_all(dir)?;
    // Unpredictable enough that nobody squats the name in advance; O_EXCL makes a squatted or
    // planted name an error, and the next name is tried.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut attempt = 0u32;
    let (tmp, mut file) = loop {
        let tmp = dir.join(format!(
            ".{}.{}.{:08x}",
            name.to_string_lossy(),
            std::process::id(),
            seed.wrapping_add(attempt.wrapping_mul(0x9e37_79b9))
        ));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
        {
            Ok(f) => break (tmp, f),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 16 => {
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    };
    let written = file
        .write_all(data)
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    drop(file);
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::File::open(dir)?.sync_all()
}

/// Refuse a state directory that is not owned by root (or by the user running us) or that group
/// or others can write (SPEC S-1). A directory that does not exist yet is fine: it is created
/// root-owned on the first write. The error names the directory and what is wrong.
pub fn check_state_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let m = match std::fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("state directory {}: {e}", dir.display())),
    };
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let problem = if !m.is_dir() {
        Some("not a directory".to_string())
    } else if m.uid() != 0 && m.uid() != euid {
        Some(format!("owned by uid {}, not root", m.uid()))
    } else if m.mode() & 0o022 != 0 {
        Some(format!(
            "mode {:04o} lets group or others write it",
            m.mode() & 0o7777
        ))
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(p) => Err(format!(
            "refusing state directory {}: {p} (its records decide what kr-tunneld deletes; \
             make it root-owned and not group/other-writable, e.g. chown root: and chmod 0755)",
            dir.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};
    use std::path::PathBuf;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("krt-statefile-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A symlink planted at the old predictable temporary name (`peers.tmp`) or at the target
    /// itself is never written through: the victim keeps its content, the target gets the data.
    #[test]
    fn symlinks_are_never_followed() {
        let d = tmpdir("symlink");
        let victim = d.join("victim");
        std::fs::write(&victim, "precious").unwrap();
        symlink(&victim, d.join("peers.tmp")).unwrap();
        symlink(&victim, d.join("fou-ports")).unwrap();
        write_atomic(&d.join("peers"), b"table").unwrap();
        write_atomic(&d.join("fou-ports"), b"ipv4 5555\n").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(std::fs::read_to_string(d.join("peers")).unwrap(), "table");
        let fou = d.join("fou-ports");
        assert!(!std::fs::symlink_metadata(&fou).unwrap().is_symlink());
        assert_eq!(std::fs::read_to_string(&fou).unwrap(), "ipv4 5555\n");
        let _ = std::fs::remove_dir_all(&d);
    }

    /// Files at predictable names (a squatted `.tmp`, a directory) do not stop the write, no
    /// temporary file is left behind, and the result is not writable by group or others.
    #[test]
    fn predictable_names_cannot_block_or_leak() {
        let d = tmpdir("predictable");
        std::fs::create_dir(d.join("peers.tmp")).unwrap();
        std::fs::write(d.join(".peers.tmp"), "squatted").unwrap();
        for i in 0..3 {
            write_atomic(&d.join("peers"), format!("v{i}").as_bytes()).unwrap();
        }
        assert_eq!(std::fs::read_to_string(d.join("peers")).unwrap(), "v2");
        let mode = std::fs::metadata(d.join("peers"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o022, 0, "{mode:o}");
        let mut names: Vec<String> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [".peers.tmp", "peers", "peers.tmp"]);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn state_dir_must_be_private_and_ours() {
        use std::os::unix::fs::PermissionsExt;
        let d = tmpdir("statedir");
        let perm = |m: u32| std::fs::set_permissions(&d, std::fs::Permissions::from_mode(m));
        perm(0o755).unwrap();
        assert_eq!(check_state_dir(&d), Ok(()));
        assert_eq!(check_state_dir(&d.join("missing")), Ok(()));
        for bad in [0o775, 0o757, 0o1777] {
            perm(bad).unwrap();
            let e = check_state_dir(&d).unwrap_err();
            assert!(
                e.contains(&d.display().to_string()) && e.contains("write"),
                "{e}"
            );
        }
        perm(0o755).unwrap();
        // SAFETY: geteuid(2) cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            std::os::unix::fs::chown(&d, Some(4242), None).unwrap();
            let e = check_state_dir(&d).unwrap_err();
            assert!(e.contains("uid 4242"), "{e}");
        }
        let f = d.join("file");
        std::fs::write(&f, "").unwrap();
        assert!(check_state_dir(&f).unwrap_err().contains("not a directory"));
        let _ = std::fs::remove_dir_all(&d);
    }
}
