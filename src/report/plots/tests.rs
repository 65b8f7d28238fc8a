//! Unit tests of `plots`.

use super::*;

fn two_lines() -> Vec<Series> {
    vec![
        Series {
            name: "one".into(),
            points: vec![(0.0, 1.0), (1.0, 0.5), (2.0, f64::NAN)],
            dashed: false,
        },
        Series {
            name: "two".into(),
            points: vec![(0.0, 2.0), (2.0, 1.5)],
            dashed: true,
        },
    ]
}

#[test]
fn chart_is_svg_with_title_axes_and_legend() {
    let s = line_chart("a < b", "step (updates)", "loss (unitless)", &two_lines()).unwrap();
    assert!(s.starts_with("<svg"), "{s}");
    assert!(s.contains("a &lt; b"), "{s}");
    for t in [">step (updates)<", ">loss (unitless)<", ">one<", ">two<"] {
        assert!(s.contains(t), "{t}: {s}");
    }
    assert!(!s.contains("NaN"));
}

/// The legend column lies right of the axes: no legend text starts left of it.
#[test]
fn legend_is_right_of_the_axes() {
    let s = line_chart("t", "x", "y", &two_lines()).unwrap();
    for name in ["one", "two"] {
        let at = s.find(&format!(">{name}</text>")).unwrap();
        let tag = &s[s[..at].rfind("<text").unwrap()..at];
        let x: f64 = tag
            .split("x=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(x >= (WIDTH - LEGEND_W) as f64, "{tag}");
    }
}

#[test]
fn png_is_a_png_of_the_scaled_size() {
    let chart = Chart {
        title: "t".into(),
        x_label: "x".into(),
        panels: vec![
            Panel {
                y_label: "y".into(),
                series: two_lines(),
            },
            Panel {
                y_label: "z".into(),
                series: vec![],
            },
        ],
    };
    let png = png(&chart, 2).unwrap();
    let img = image::load_from_memory(&png).unwrap();
    let (w, h) = size(&chart);
    assert_eq!((img.width(), img.height()), (2 * w, 2 * h));
    // some text and lines were drawn: not all white
    let rgb = img.to_rgb8();
    assert!(rgb.pixels().filter(|p| p.0 != [255, 255, 255]).count() > 1000);
}

#[test]
fn long_series_are_thinned() {
    let p: Vec<(f64, f64)> = (0..10_001).map(|i| (i as f64, 1.0)).collect();
    let t = thin(&p);
    assert!(t.len() <= MAX_POINTS + 1);
    assert_eq!(t.last(), p.last());
}
