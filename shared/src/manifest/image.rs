//! `[data.image]`: a study over images. Every site's dataset is an image folder (PNG,
//! JPEG or DICOM files with a labels CSV); each image becomes the model's input through
//! the public settings here, the same at every site: window (DICOM), crop, resize,
//! channels, then normalisation. The model reads `channels × height × width` inputs,
//! channel-major (CHW), named `pixel[c,y,x]`.

use serde::{Deserialize, Serialize};

use super::{ManifestError, invalid};

/// The largest side an image input may have (a 1024 × 1024 RGB input is 3 M values).
pub const MAX_SIDE: usize = 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageInput {
    /// Channels the model reads: 1 (greyscale; colour images are converted by ITU-R
    /// BT.601 luma) or 3 (RGB; a greyscale image is repeated).
    pub channels: usize,
    /// `[height, width]` the model reads.
    pub size: [usize; 2],
    /// `[height, width]` of a centre crop taken before any resize.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crop: Option<[usize; 2]>,
    /// How an image of another size is brought to `size`; without it such an image is
    /// refused (or skipped, as the site's dataset says).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resize: Option<Resize>,
    /// A DICOM window on the modality values (Hounsfield units for CT): values map
    /// linearly onto [0, 1] (DICOM PS3.3 C.11.2.1.2.1). Without it DICOM values stay in
    /// modality units. PNG and JPEG values are always scaled to [0, 1] by bit depth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Window>,
    /// Per-channel normalisation after all of the above: `(v − mean) / std`. Empty
    /// means 0 and 1.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mean: Vec<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub std: Vec<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resize {
    /// Bilinear, sampling at pixel centres (PyTorch's `align_corners = False`).
    Bilinear,
    Nearest,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    pub center: f64,
    pub width: f64,
}

impl ImageInput {
    pub fn height(&self) -> usize {
        self.size[0]
    }

    pub fn width(&self) -> usize {
        self.size[1]
    }

    /// The model's input width: channels × height × width.
    pub fn inputs(&self) -> usize {
        self.channels * self.size[0] * self.size[1]
    }

    /// The input names, channel-major: `pixel[c,y,x]`.
    pub fn input_names(&self) -> Vec<String> {
        let mut out = Vec::with_capacity(self.inputs());
        for c in 0..self.channels {
            for y in 0..self.size[0] {
                for x in 0..self.size[1] {
                    out.push(format!("pixel[{c},{y},{x}]"));
                }
            }
        }
        out
    }

    /// Channel `c`'s mean and standard deviation.
    pub fn normalisation(&self, c: usize) -> (f64, f64) {
        (
            self.mean.get(c).copied().unwrap_or(0.0),
            self.std.get(c).copied().unwrap_or(1.0),
        )
    }

    pub fn validate(&self) -> Result<(), ManifestError> {
        if !matches!(self.channels, 1 | 3) {
            return Err(invalid(format!(
                "data.image.channels = {} must be 1 (grey) or 3 (RGB)",
                self.channels
            )));
        }
        let side_ok = |s: [usize; 2]| s.iter().all(|v| (1..=MAX_SIDE).contains(v));
        if !side_ok(self.size) {
            return Err(invalid(format!(
                "data.image.size = {:?}: height and width must be 1..={MAX_SIDE}",
                self.size
            )));
        }
        if let Some(crop) = self.crop {
            if !side_ok(crop) {
                return Err(invalid(format!(
                    "data.image.crop = {crop:?}: height and width must be 1..={MAX_SIDE}"
                )));
            }
            if crop != self.size && self.resize.is_none() {
                return Err(invalid(format!(
                    "data.image.crop = {crop:?} differs from data.image.size = {:?} and no resize is set",
                    self.size
                )));
            }
        }
        if let Some(w) = self.window
            && !(w.center.is_finite() && w.width.is_finite() && w.width >= 1.0)
        {
            return Err(invalid(
                "data.image.window needs a finite center and a width of at least 1",
            ));
        }
        for (name, list) in [("mean", &self.mean), ("std", &self.std)] {
            if !list.is_empty() && list.len() != self.channels {
                return Err(invalid(format!(
                    "data.image.{name} lists {} values for {} channels",
                    list.len(),
                    self.channels
                )));
            }
        }
        if self.mean.iter().any(|v| !v.is_finite()) || self.std.iter().any(|v| !(v.is_finite() && *v > 0.0)) {
            return Err(invalid(
                "data.image.mean must be finite and data.image.std positive and finite",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grey(size: [usize; 2]) -> ImageInput {
        ImageInput {
            channels: 1,
            size,
            crop: None,
            resize: None,
            window: None,
            mean: Vec::new(),
            std: Vec::new(),
        }
    }

    #[test]
    fn inputs_are_named_channel_major() {
        let mut spec = grey([2, 3]);
        spec.channels = 3;
        let names = spec.input_names();
        assert_eq!(names.len(), spec.inputs());
        assert_eq!(names[0], "pixel[0,0,0]");
        assert_eq!(names[5], "pixel[0,1,2]");
        assert_eq!(names[6], "pixel[1,0,0]");
    }

    #[test]
    fn bad_settings_are_refused_by_name() {
        let mut spec = grey([8, 8]);
        spec.channels = 2;
        assert!(spec.validate().expect_err("refused").to_string().contains("channels"));
        let spec = grey([0, 8]);
        assert!(spec.validate().expect_err("refused").to_string().contains("size"));
        let mut spec = grey([8, 8]);
        spec.crop = Some([6, 6]);
        assert!(spec.validate().expect_err("refused").to_string().contains("no resize"));
        let mut spec = grey([8, 8]);
        spec.std = vec![0.0];
        assert!(spec.validate().expect_err("refused").to_string().contains("std"));
        let mut spec = grey([8, 8]);
        spec.mean = vec![0.5, 0.5];
        assert!(
            spec.validate()
                .expect_err("refused")
                .to_string()
                .contains("mean lists 2")
        );
        assert!(grey([8, 8]).validate().is_ok());
    }
}
