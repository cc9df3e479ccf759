//! Builds `tests/c/abi_smoke.c` against `include/forkpatch.h` and the
//! staticlib cargo produced next to this test, and runs it: proves the
//! header matches the Rust ABI (struct layout included).

use std::path::PathBuf;
use std::process::Command;

#[test]
fn c_header_and_staticlib_work_together() {
    assert_eq!(std::mem::size_of::<forkpatch::Stats>(), 168);
    // Cargo builds the staticlib next to the rlib this test links
    // (target/<profile>/deps/libforkpatch-<hash>.a) but does not copy it up
    // for test builds; take the newest one.
    let deps = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let lib = std::fs::read_dir(&deps)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with("libforkpatch-") && n.ends_with(".a")
        })
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
        .expect("libforkpatch-*.a next to the test binary");
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("abi_smoke");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let st = Command::new(&cc)
        .args(["-std=c11", "-D_GNU_SOURCE", "-Wall", "-Werror", "-O1", "-I"])
        .arg(dir.join("include"))
        .arg(dir.join("tests/c/abi_smoke.c"))
        .arg(&lib)
        .args(["-lpthread", "-ldl", "-lm", "-o"])
        .arg(&out)
        .status()
        .expect("a C compiler (cc) is needed for this test");
    assert!(st.success(), "C build failed");
    let o = Command::new(&out).output().unwrap();
    eprintln!("{}", String::from_utf8_lossy(&o.stdout));
    eprintln!("{}", String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success());
}
