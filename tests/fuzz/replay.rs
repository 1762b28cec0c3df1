//! The fuzz targets on stable Rust, in `cargo test`: every committed seed
//! (`tests/fuzz/seeds/<target>/`, see seeds.py), every input that ever crashed a target
//! (`tests/fuzz/regressions/<target>/`), and a bounded number of deterministic mutations of them
//! (bit flips, interesting bytes, truncation, insertion, duplication, splicing) go through the
//! same functions as the cargo-fuzz targets (`tests/fuzz/targets.rs`). A panic fails the test and
//! names the target and the input (hex, and saved under the system temp directory).
//!
//! `KRT_FUZZ_REPLAY_ITERS` (default 5000 per target) sets the number of mutations.

#[cfg(test)]
mod tests {
    use std::panic::{self, AssertUnwindSafe};
    use std::path::{Path, PathBuf};

    use crate::fuzz_targets::TARGETS;

    fn dir(kind: &str, target: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fuzz")
            .join(kind)
            .join(target)
    }

    fn files(d: &Path) -> Vec<Vec<u8>> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(d)
            .map(|r| r.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        v.sort();
        v.iter().filter_map(|p| std::fs::read(p).ok()).collect()
    }

    /// xorshift64*: deterministic, no dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            if n == 0 {
                0
            } else {
                (self.next() % n as u64) as usize
            }
        }
    }

    const INTERESTING: &[u8] = &[
        0, 1, 2, 3, 4, 7, 8, 0x10, 0x7f, 0x80, 0xfe, 0xff, b'"', b'{', b'\n',
    ];

    fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
        let mut v = input.to_vec();
        for _ in 0..1 + rng.below(4) {
            let len = v.len();
            match rng.below(7) {
                0 if len > 0 => {
                    let i = rng.below(len);
                    v[i] ^= 1 << rng.below(8);
                }
                1 if len > 0 => {
                    let i = rng.below(len);
                    v[i] = INTERESTING[rng.below(INTERESTING.len())];
                }
                2 if len > 0 => v.truncate(rng.below(len)),
                3 => {
                    let i = rng.below(len + 1);
                    let n = 1 + rng.below(8);
                    let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                    v.splice(i..i, bytes);
                }
                4 if len > 1 => {
                    let a = rng.below(len);
                    let b = (a + 1 + rng.below(32)).min(len);
                    let chunk = v[a..b].to_vec();
                    let at = rng.below(len + 1);
                    v.splice(at..at, chunk);
                }
                5 if !other.is_empty() => {
                    let cut = rng.below(len + 1);
                    let from = rng.below(other.len());
                    v.truncate(cut);
                    v.extend_from_slice(&other[from..]);
                }
                // Lengths in netlink headers: poke a 16-bit length at a 4-aligned offset.
                _ if len >= 4 => {
                    let i = rng.below(len / 4) * 4;
                    let val = [0u16, 1, 3, 4, 5, 0xffff, len as u16][rng.below(7)];
                    v[i..i + 2].copy_from_slice(&val.to_ne_bytes());
                }
                _ => v.push(rng.next() as u8),
            }
        }
        v
    }

    fn run_one(name: &str, f: fn(&[u8]), input: &[u8]) {
        let r = panic::catch_unwind(AssertUnwindSafe(|| f(input)));
        if r.is_err() {
            let path = std::env::temp_dir().join(format!("krt-fuzz-{name}-crash"));
            let _ = std::fs::write(&path, input);
            let hex: String = input.iter().map(|b| format!("{b:02x}")).collect();
            panic!(
                "fuzz target {name} panicked on {} bytes (saved to {}): {hex}",
                input.len(),
                path.display()
            );
        }
    }

    #[test]
    fn fuzz_seeds_regressions_and_mutations_do_not_panic() {
        let iters: usize = std::env::var("KRT_FUZZ_REPLAY_ITERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(5000);
        let mut total = 0;
        for (name, f) in TARGETS {
            let mut inputs = files(&dir("seeds", name));
            assert!(
                !inputs.is_empty(),
                "no seeds for {name}: run tests/fuzz/seeds.py"
            );
            inputs.extend(files(&dir("regressions", name)));
            for i in &inputs {
                run_one(name, *f, i);
            }
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ name.len() as u64);
            for _ in 0..iters {
                let a = &inputs[rng.below(inputs.len())];
                let b = &inputs[rng.below(inputs.len())];
                let m = mutate(&mut rng, a, b);
                run_one(name, *f, &m);
            }
            total += inputs.len() + iters;
        }
        eprintln!("fuzz replay: {total} inputs over {} targets", TARGETS.len());
    }
}
