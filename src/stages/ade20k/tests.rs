//! Unit tests of `ade20k`.

use super::*;

#[test]
fn defaults_and_layer_scaling() {
    assert_eq!(default_layers(12), vec![3, 5, 7, 11]);
    assert_eq!(default_layers(24), vec![7, 11, 15, 23]);
    assert_eq!(default_layers(2), vec![0, 0, 0, 1]);
    let p = Params::default();
    assert_eq!(p.lr(), 8e-4);
    assert_eq!(p.stride(), 341);
    let mut u = p.clone();
    u.protocol = Protocol::Upernet;
    assert_eq!(u.stride(), 256);
    assert_eq!(u.lr(), 1e-4);
}
