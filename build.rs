//! Compiles `csrc/jpeg_region.c` (region + DCT-scaled JPEG decoding for the loader's `decode:
//! scaled` mode) against the system libjpeg-turbo (`libjpeg62-turbo-dev` on Debian).

fn main() {
    println!("cargo:rerun-if-changed=csrc/jpeg_region.c");
    cc::Build::new()
        .file("csrc/jpeg_region.c")
        .opt_level(2)
        .warnings(true)
        .compile("cjepa_jpeg_region");
    println!("cargo:rustc-link-lib=jpeg");
}
