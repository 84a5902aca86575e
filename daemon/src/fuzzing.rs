//! Entry points for `cargo fuzz` (`fuzz/`): the first code a stranger's bytes reach. Each
//! takes any bytes and must neither panic nor hang; what they return is not the point.

use std::sync::OnceLock;

use crate::config::PayloadFormat;
use crate::engine::Manifest;
use crate::feeds::Data;

/// A fleet command's payload: the envelope, its id as a busy reply reads it, and the arguments
/// through every command's own parser.
pub fn command(payload: &[u8]) {
    let _ = crate::fleet::commands::peek_id(payload, usize::MAX);
    if let Ok(env) = crate::fleet::commands::envelope(payload, usize::MAX) {
        for e in crate::control::commands::TABLE {
            let _ = e.check(env.args.clone());
        }
    }
}

/// A message on an MQTT feed, in each payload format, and what it decodes to prepared for an
/// image model (the PNG/JPEG decoder with its limits, or a tensor's shape check).
pub fn feed_sample(payload: &[u8]) {
    static MANIFEST: OnceLock<Manifest> = OnceLock::new();
    let m = MANIFEST.get_or_init(|| {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../firmware-updates/models/digits-cnn-int8"
        );
        Manifest::read(std::path::Path::new(dir)).expect("the digits package's manifest")
    });
    let fields = ["a".to_string(), "b".to_string()];
    for format in [
        PayloadFormat::Auto,
        PayloadFormat::Image,
        PayloadFormat::Json,
    ] {
        if let Ok(Data::Input(Ok(input))) = crate::feeds::mqtt::parse(payload, format, &fields) {
            let _ = input.prepare(m);
        }
    }
}

#[cfg(test)]
mod tests {
    /// The fuzz targets' seeds, and a few hostile inputs, run through the entry points on
    /// every test run, so the targets cannot rot between fuzzing sessions.
    #[test]
    fn the_fuzz_entry_points_take_their_seeds_and_junk() {
        let seeds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
        let mut n = 0;
        for (target, run) in [
            ("command_envelope", super::command as fn(&[u8])),
            ("feed_sample", super::feed_sample),
        ] {
            for e in std::fs::read_dir(seeds.join(target)).unwrap() {
                run(&std::fs::read(e.unwrap().path()).unwrap());
                n += 1;
            }
            for junk in [
                &b""[..],
                b"{",
                b"[[[[[[[[",
                b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR",
                b"null",
            ] {
                run(junk);
            }
        }
        assert!(n >= 5, "{n} seeds");
    }
}
