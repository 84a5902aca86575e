//! Unpacking an artifact: arbitrary bytes as a tar archive must never write outside the
//! destination, and never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("out");
    let _ = tern_update::artifact::unpack(data, &dest);
    // Everything written is under `dest` (the only entry of `dir`).
    for e in std::fs::read_dir(dir.path()).unwrap() {
        assert_eq!(e.unwrap().file_name(), "out");
    }
});
