//! Compiles `csrc/jpeg_region.c` (region + DCT-scaled JPEG decoding for the loader's `decode:
//! scaled` mode) against the system libjpeg-turbo (`libjpeg62-turbo-dev` on Debian).

fn main() {
    println!("cargo:rerun-if-changed=csrc/jpeg_region.c");
    let probe = cc::Build::new().get_compiler();
    let has_header = std::process::Command::new(probe.path())
        .args(["-E", "-x", "c", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin
                .take()
                .expect("stdin")
                .write_all(b"#include <stdio.h>\n#include <jpeglib.h>\n")?;
            c.wait()
        })
        .map(|s| s.success())
        .unwrap_or(true);
    if !has_header {
        panic!(
            "jpeglib.h not found: the loader links the system libjpeg-turbo; install it with \
             `bash scripts/build-deps.sh` (Debian: apt-get install libjpeg62-turbo-dev)"
        );
    }
    cc::Build::new()
        .file("csrc/jpeg_region.c")
        .opt_level(2)
        .warnings(true)
        .compile("cjepa_jpeg_region");
    println!("cargo:rustc-link-lib=jpeg");
}
