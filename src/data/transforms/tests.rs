//! Unit tests of `transforms`.

use super::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn pattern(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let v = |c: u32| ((x * 37 + y * 91 + c * 53 + x * y * 7) % 256) as u8;
        image::Rgb([v(0), v(1), v(2)])
    })
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Expected bytes produced by Pillow 13.0 `Image.resize(size, Image.BICUBIC / BILINEAR)`.
#[test]
fn bicubic_matches_pillow() {
    let img = pattern(13, 9);
    let cases = [
        ((5, 4), "65828f7a87937b7d86707e8b7693737e8580908c868b827a808181899191709a7a80806e92897e7d84698c688283669685758c777a7d7f7c8681619c"),
        ((13, 4), "497e817376b26aa76a9c5e97538bc080b559aa4e834378b06da567995c99518d918285547aaf81619678967d738176a582a86aac6fa473a85eac6297659c5d9c618f659389978e6f9273b077b48177b48158867c9b9077559355a75a8f6ea359bf6da282a8694c7d6c9a8076947b498f659a795e8f8f5e968447836aa7aa98669f8a4f8473a84c656fa492558d7bb04d6d70ad945e968153887679ae"),
        ((6, 9), "174c8164a1d8bcaf6e423569508db8a5da2f7db8c1a76a46335fa59cc8af915454437eb9b677404b74b4b5aa695b508b91ba978e4f573671acb8b77b7d6b94a492525857979ed9a3a1aa6b7f6387a8a36476719ab69a5e6f78b2609c6b8b8b5780668f6ead766385638e4f5760959e5b9876a296669881649569699867a3935a8f7a679c795f9489598e88669b6f77ac855489a774ab659058649c7f6c8e8e874883"),
        ((3, 2), "7a88878382837d89817f7f8384817a847285"),
    ];
    for ((w, h), want) in cases {
        assert_eq!(resize_bicubic(&img, w, h).as_raw(), &hex(want), "{w}x{h}");
    }
    let up = resize_bicubic(&img, 17, 11);
    assert_eq!(
        &up.as_raw()[..24],
        &hex("002f6412477b30649e4d83c268a7dd8cc4ffabef9accca14")[..]
    );
    let bilinear = [
        ((5, 4), "6a838f7887927e7c867382897790767b86828c8d848d807e7f817f87909073937a80827190867f7c846d8a6a8083699284758a7a7980807c84816499"),
        ((3, 2), "7a88868382837d87817d818384807c847484"),
    ];
    for ((w, h), want) in bilinear {
        assert_eq!(
            resize(&img, w, h, Interpolation::Bilinear).as_raw(),
            &hex(want),
            "bilinear {w}x{h}"
        );
    }
    // Width grows, height shrinks: Pillow 13 runs the vertical pass first.
    let wide = resize(&img, 20, 3, Interpolation::Bilinear);
    assert_eq!(&wide.as_raw()[..12], &hex("52877c687e927e7ba4719882")[..]);
    let two = RgbImage::from_raw(2, 1, vec![0, 0, 0, 255, 255, 255]).unwrap();
    assert_eq!(resize_bicubic(&two, 1, 1).as_raw(), &vec![128, 128, 128]);
}

/// FNV-1a 64 of Pillow 13.0 `Image.resize` output bytes for a 37x29 test image.
#[test]
fn resize_hashes_match_pillow() {
    let img = RgbImage::from_fn(37, 29, |x, y| {
        let v = |c: u32| {
            ((x * 37 + y * 91 + c * 53 + x * y * 7 + (x * x * 3 + y * y * 5) % 17) % 256) as u8
        };
        image::Rgb([v(0), v(1), v(2)])
    });
    let fnv = |b: &[u8]| {
        b.iter().fold(0xcbf29ce484222325u64, |h, &x| {
            (h ^ x as u64).wrapping_mul(0x100000001b3)
        })
    };
    let cases = [
        ((7, 5), Interpolation::Bicubic, 0x566335e883276aebu64),
        ((36, 28), Interpolation::Bicubic, 0xf57767f1fcdaf989),
        ((38, 30), Interpolation::Bicubic, 0x08e154a384bfc83e),
        ((74, 10), Interpolation::Bicubic, 0xe001336f5335f831),
        ((10, 74), Interpolation::Bicubic, 0xbfda0e55b1959dcb),
        ((16, 16), Interpolation::Bicubic, 0x422d26a5b5a05130),
        ((224, 224), Interpolation::Bicubic, 0x88953092191379a8),
        ((1, 1), Interpolation::Bicubic, 0xab5d5d197390205b),
        ((37, 3), Interpolation::Bicubic, 0xde2364183d746680),
        ((3, 29), Interpolation::Bicubic, 0xbffbd3621e3b4f45),
        ((50, 20), Interpolation::Bicubic, 0x6d367fcd6c3f3d90),
        ((20, 50), Interpolation::Bicubic, 0x6cfda20d7bb27551),
        ((36, 10), Interpolation::Bicubic, 0xbda912535630db33),
        ((12, 27), Interpolation::Bicubic, 0xc9b8fac277206f9c),
        ((7, 5), Interpolation::Bilinear, 0x473e432de68a65d3),
        ((36, 28), Interpolation::Bilinear, 0xaa9a7bb5475687f0),
        ((38, 30), Interpolation::Bilinear, 0xf48eb0980b937f82),
        ((74, 10), Interpolation::Bilinear, 0xa10582e37cef3b17),
        ((10, 74), Interpolation::Bilinear, 0xcb7d314efd277398),
        ((16, 16), Interpolation::Bilinear, 0x056fcdf7551a0719),
        ((224, 224), Interpolation::Bilinear, 0x7ca971a133ec8442),
        ((1, 1), Interpolation::Bilinear, 0xab5d5d197390205b),
        ((37, 3), Interpolation::Bilinear, 0xf82f1c110a76aef5),
        ((3, 29), Interpolation::Bilinear, 0x6e8ddb753b908a72),
        ((50, 20), Interpolation::Bilinear, 0x9a3f56012a5ee9d2),
        ((20, 50), Interpolation::Bilinear, 0xb40ba08b33d436a0),
        ((36, 10), Interpolation::Bilinear, 0xd6607d284ddf3b14),
        ((12, 27), Interpolation::Bilinear, 0x64a4af3defc87a0d),
    ];
    for ((w, h), f, want) in cases {
        assert_eq!(fnv(resize(&img, w, h, f).as_raw()), want, "{f:?} {w}x{h}");
    }
}

#[test]
fn flip_twice_is_identity() {
    let img = pattern(7, 5);
    assert_ne!(hflip(&img), img);
    assert_eq!(hflip(&hflip(&img)), img);
    assert_eq!(hflip(&img).get_pixel(0, 0), img.get_pixel(6, 0));
}

#[test]
fn resize_shorter_and_center_crop_sizes() {
    let img = pattern(100, 80);
    let r = resize_shorter(&img, 73);
    assert_eq!((r.width(), r.height()), (91, 73));
    let c = center_crop(&r, 64, 64);
    assert_eq!((c.width(), c.height()), (64, 64));
    // (5 - 2) / 2 = 1.5 rounds half to even -> 2, as Python's round.
    let small = pattern(5, 5);
    let c = center_crop(&small, 2, 2);
    assert_eq!(c.get_pixel(0, 0), small.get_pixel(2, 2));
    // Padding when the crop is larger than the image.
    let p = center_crop(&pattern(3, 3), 5, 4);
    assert_eq!((p.width(), p.height()), (5, 4));
    assert_eq!(p.get_pixel(0, 0), &image::Rgb([0, 0, 0]));
    let t = Transform::imagenet_eval(64);
    let out = t.apply(&img, &mut ChaCha8Rng::seed_from_u64(0));
    assert_eq!(out.shape(), [3, 64, 64]);
}

#[test]
fn normalize_values() {
    let img = RgbImage::from_raw(2, 1, vec![255, 0, 128, 0, 255, 64]).unwrap();
    let chw = to_chw_normalized(&img, IMAGENET_MEAN, IMAGENET_STD);
    assert_eq!(chw.shape(), [3, 1, 2]);
    let want = |v: f32, c: usize| (v / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
    assert_eq!(
        chw.data,
        vec![
            want(255.0, 0),
            want(0.0, 0),
            want(0.0, 1),
            want(255.0, 1),
            want(128.0, 2),
            want(64.0, 2)
        ]
    );
    assert!((chw.data[0] - 2.2489083).abs() < 1e-6);
}

#[test]
fn random_resized_crop_params() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let rrc = RandomResizedCrop::new(32);
    for _ in 0..200 {
        let b = rrc.get_params(50, 40, &mut rng);
        assert!(b.width > 0 && b.height > 0 && b.left + b.width <= 50 && b.top + b.height <= 40);
    }
    let full = RandomResizedCrop {
        size: 8,
        scale: (1.0, 1.0),
        ratio: (1.0, 1.0),
    };
    assert_eq!(
        full.get_params(20, 20, &mut rng),
        CropBox {
            top: 0,
            left: 0,
            height: 20,
            width: 20
        }
    );
    // Impossible request -> central-crop fallback.
    assert_eq!(
        full.get_params(100, 1, &mut rng),
        CropBox {
            top: 0,
            left: 49,
            height: 1,
            width: 1
        }
    );
    let t = Transform::imagenet_train(16);
    let img = pattern(40, 30);
    let a = t.apply(&img, &mut ChaCha8Rng::seed_from_u64(9));
    let b = t.apply(&img, &mut ChaCha8Rng::seed_from_u64(9));
    assert_eq!(a, b);
    assert_eq!(a.shape(), [3, 16, 16]);
}
