//! The pretraining crops with a choice of filter: `RandomResizedCrop` (the same box draws as the
//! stage's transform), then a resize with [`Interpolation::Bicubic`] (ours, as the stage) or
//! [`Interpolation::Bilinear`] (torchvision's default, which the official code uses), then the
//! ImageNet normalisation. With bicubic the output equals the stage's transform.

use std::path::PathBuf;

use rand_chacha::ChaCha8Rng;

use crate::data::loader::Source;
use crate::data::transforms::{
    crop, decode_rgb, resize, to_chw_normalized, Interpolation, RandomResizedCrop, IMAGENET_MEAN,
    IMAGENET_STD,
};
use crate::data::{Chw, DataError};

/// Image files cropped as the stage crops them, resized with `interpolation`.
#[derive(Debug, Clone)]
pub struct Crops {
    /// `(path, label)` of the images.
    pub samples: Vec<(PathBuf, usize)>,
    /// Box parameters.
    pub rrc: RandomResizedCrop,
    /// Resize filter.
    pub interpolation: Interpolation,
}

impl Source for Crops {
    fn len(&self) -> usize {
        self.samples.len()
    }

    fn get(&self, index: usize, rng: &mut ChaCha8Rng) -> Result<(Chw, usize), DataError> {
        let (path, label) = self
            .samples
            .get(index)
            .ok_or_else(|| DataError::param("index", format!("sample {index} out of range")))?;
        let img = decode_rgb(path)?;
        let b = self.rrc.get_params(img.width(), img.height(), rng);
        let s = self.rrc.size;
        let out = resize(&crop(&img, b), s, s, self.interpolation);
        Ok((to_chw_normalized(&out, IMAGENET_MEAN, IMAGENET_STD), *label))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::imagefolder::ImageFolder;
    use crate::data::loader::ImageSamples;
    use crate::data::synth::{synth, SynthParams};
    use crate::data::DataFormat;
    use rand::SeedableRng;

    /// With bicubic, the crops are the pretrain stage's transform, sample for sample.
    #[test]
    fn bicubic_crops_are_the_stage_transform() {
        let dir = tempfile::tempdir().unwrap();
        synth(DataFormat::ImageFolder, dir.path(), 0, &SynthParams::tiny()).unwrap();
        let samples = ImageFolder::open(dir.path(), "train").unwrap().samples;
        let p = crate::stages::pretrain::Params::default();
        let stage = ImageSamples {
            samples: samples.clone(),
            transform: p.transform(32),
        };
        let rrc = RandomResizedCrop {
            scale: (p.crop_scale[0], p.crop_scale[1]),
            ..RandomResizedCrop::new(32)
        };
        let ours = |interpolation| Crops {
            samples: samples.clone(),
            rrc: rrc.clone(),
            interpolation,
        };
        let rng = || ChaCha8Rng::seed_from_u64(7);
        for i in 0..3 {
            let want = stage.get(i, &mut rng()).unwrap().0;
            let got = ours(Interpolation::Bicubic).get(i, &mut rng()).unwrap().0;
            assert_eq!(got.data, want.data, "sample {i}");
            let other = ours(Interpolation::Bilinear).get(i, &mut rng()).unwrap().0;
            assert_ne!(other.data, want.data, "sample {i}");
        }
    }
}
