//! Image datasets: a folder of PNG, JPEG or DICOM files and a labels CSV naming each
//! image's file, its label and (optionally) its patient. A study reads it through its
//! `[data.image]` settings, which are public and the same at every site: each image
//! becomes `channels × height × width` inputs (channel-major) by
//!
//! 1. decoding: PNG and JPEG values scaled to [0, 1] by bit depth; DICOM stored values
//!    to modality values (rescale slope and intercept; MONOCHROME1 inverted), then the
//!    study's window onto [0, 1] when it sets one;
//! 2. a centre crop, when set;
//! 3. a resize to the study's size, when set (else an image of another size is bad);
//! 4. the channel count: colour to grey by BT.601 luma, grey repeated to RGB;
//! 5. per-channel normalisation `(v − mean) / std`.
//!
//! The labels CSV goes through the same [`Encoder`] as any table (label classes,
//! missing labels, person ids); an image that cannot be used refuses the dataset, or
//! under `bad_image = "skip"` leaves its row out, counted. Errors name the file; a
//! refusal the coordinator sees names only the kind of fault.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use medfl_shared::manifest::{DataSchema, ImageInput, Resize};
use serde::Deserialize;

use super::{Cell, DataError, Dataset, Encoded, Encoder, dicom, number_text};

/// `[datasets.images]`: where an image dataset's files are.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImagesSource {
    /// The folder holding the images, relative to agent.toml.
    pub folder: PathBuf,
    /// The labels CSV, relative to the folder.
    #[serde(default = "default_labels")]
    pub labels: PathBuf,
    /// The labels CSV's column naming each image's file, relative to the folder.
    #[serde(default = "default_file_column")]
    pub file_column: String,
    /// An image that cannot be used (unreadable, truncated, the wrong size, …): refuse
    /// the dataset (the default) or leave its row out.
    #[serde(default)]
    pub bad_image: BadImage,
    /// DICOM images marked with burned-in annotation: refused unless `allow`.
    #[serde(default)]
    pub burned_in_annotation: BurnedIn,
}

fn default_labels() -> PathBuf {
    "labels.csv".into()
}

fn default_file_column() -> String {
    "file".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BadImage {
    #[default]
    Refuse,
    Skip,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BurnedIn {
    #[default]
    Refuse,
    Allow,
}

impl ImagesSource {
    pub(super) fn validate(&self, dataset: &str) -> Result<(), String> {
        if self.folder.as_os_str().is_empty() || self.file_column.is_empty() {
            return Err(format!(
                "dataset {dataset:?}: [datasets.images] needs a `folder` and a `file_column`"
            ));
        }
        Ok(())
    }
}

/// An image as decoded, before the study's settings: `channels` values a pixel,
/// row-major (HWC).
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub values: Vec<f32>,
    /// What the agent may log: the format (a DICOM transfer syntax's name).
    pub format: &'static str,
}

/// Decodes one file by its content (DICOM's `DICM` preamble, PNG's or JPEG's
/// signature). PNG and JPEG values come scaled to [0, 1]; DICOM values are modality
/// values, windowed onto [0, 1] when `spec` sets a window.
pub fn decode(path: &Path, spec: &ImageInput, allow_burned_in: bool) -> Result<Decoded, String> {
    if path.is_dir() {
        return Err("is a folder (a whole series?): medfl reads one image a file for now".into());
    }
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() >= 132 && &bytes[128..132] == b"DICM" {
        let image = dicom::read(path, allow_burned_in).map_err(|e| e.to_string())?;
        let mut values = image.modality_values();
        if let Some(w) = spec.window {
            // DICOM PS3.3 C.11.2.1.2.1, the linear VOI function onto [0, 1].
            let (c, width) = (w.center, w.width);
            for v in &mut values {
                let x = f64::from(*v);
                *v = if x <= c - 0.5 - (width - 1.0) / 2.0 {
                    0.0
                } else if x > c - 0.5 + (width - 1.0) / 2.0 {
                    1.0
                } else {
                    (((x - (c - 0.5)) / (width - 1.0)) + 0.5) as f32
                };
            }
        }
        return Ok(Decoded {
            channels: image.samples,
            height: image.rows,
            width: image.columns,
            values,
            format: image.transfer_syntax,
        });
    }
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        return decode_png(&bytes);
    }
    if bytes.starts_with(&[0xFF, 0xD8]) {
        return decode_jpeg(&bytes);
    }
    Err("is not a PNG, JPEG or DICOM file (no signature medfl knows)".into())
}

fn decode_png(bytes: &[u8]) -> Result<Decoded, String> {
    let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::EXPAND);
    let mut reader = decoder.read_info().map_err(|e| format!("not a readable PNG ({e})"))?;
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| "its PNG header gives no size".to_string())?;
    let mut buf = vec![0; size];
    let info = reader
        .next_frame(&mut buf)
        .map_err(|e| format!("not a readable PNG ({e})"))?;
    let (channels, alpha) = match info.color_type {
        png::ColorType::Grayscale => (1, false),
        png::ColorType::GrayscaleAlpha => (1, true),
        png::ColorType::Rgb => (3, false),
        png::ColorType::Rgba => (3, true),
        png::ColorType::Indexed => return Err("its palette was not expanded".into()),
    };
    let stride = channels + usize::from(alpha);
    let samples: Vec<f32> = match info.bit_depth {
        png::BitDepth::Sixteen => buf[..info.buffer_size()]
            .chunks_exact(2)
            .map(|b| f32::from(u16::from_be_bytes([b[0], b[1]])) / 65535.0)
            .collect(),
        _ => buf[..info.buffer_size()]
            .iter()
            .map(|&b| f32::from(b) / 255.0)
            .collect(),
    };
    let values = samples
        .chunks_exact(stride)
        .flat_map(|px| px[..channels].iter().copied())
        .collect();
    Ok(Decoded {
        channels,
        height: info.height as usize,
        width: info.width as usize,
        values,
        format: "PNG",
    })
}

fn decode_jpeg(bytes: &[u8]) -> Result<Decoded, String> {
    let mut decoder = jpeg_decoder::Decoder::new(bytes);
    let pixels = decoder.decode().map_err(|e| format!("not a readable JPEG ({e})"))?;
    let info = decoder
        .info()
        .ok_or_else(|| "its JPEG header gives no size".to_string())?;
    let (channels, values): (usize, Vec<f32>) = match info.pixel_format {
        jpeg_decoder::PixelFormat::L8 => (1, pixels.iter().map(|&b| f32::from(b) / 255.0).collect()),
        jpeg_decoder::PixelFormat::L16 => (
            1,
            pixels
                .chunks_exact(2)
                .map(|b| f32::from(u16::from_be_bytes([b[0], b[1]])) / 65535.0)
                .collect(),
        ),
        jpeg_decoder::PixelFormat::RGB24 => (3, pixels.iter().map(|&b| f32::from(b) / 255.0).collect()),
        jpeg_decoder::PixelFormat::CMYK32 => return Err("is a CMYK JPEG, which medfl does not read".into()),
    };
    Ok(Decoded {
        channels,
        height: usize::from(info.height),
        width: usize::from(info.width),
        values,
        format: "JPEG",
    })
}

/// Applies the study's crop, resize, channel count and normalisation to a decoded
/// image; the result is the model's input, channel-major.
pub fn prepare(image: &Decoded, spec: &ImageInput) -> Result<Vec<f32>, String> {
    let (c_in, mut h, mut w) = (image.channels, image.height, image.width);
    // Channel-major planes of the source.
    let mut planes: Vec<Vec<f32>> = (0..c_in)
        .map(|c| image.values.iter().skip(c).step_by(c_in).copied().collect())
        .collect();
    if let Some([ch, cw]) = spec.crop {
        if ch > h || cw > w {
            return Err(format!("is {h}×{w}, smaller than the study's crop of {ch}×{cw}"));
        }
        let (top, left) = ((h - ch) / 2, (w - cw) / 2);
        for plane in &mut planes {
            *plane = (0..ch)
                .flat_map(|y| plane[(top + y) * w + left..(top + y) * w + left + cw].to_vec())
                .collect();
        }
        (h, w) = (ch, cw);
    }
    let [oh, ow] = spec.size;
    if (h, w) != (oh, ow) {
        let Some(how) = spec.resize else {
            return Err(format!(
                "is {h}×{w}, the study reads {oh}×{ow} and sets no data.image.resize"
            ));
        };
        for plane in &mut planes {
            *plane = resize(plane, h, w, oh, ow, how);
        }
    }
    let planes = match (c_in, spec.channels) {
        (a, b) if a == b => planes,
        (3, 1) => {
            // ITU-R BT.601 luma.
            let luma = (0..oh * ow)
                .map(|i| 0.299 * planes[0][i] + 0.587 * planes[1][i] + 0.114 * planes[2][i])
                .collect();
            vec![luma]
        }
        (1, 3) => vec![planes[0].clone(), planes[0].clone(), planes[0].clone()],
        (a, b) => return Err(format!("has {a} channels, the study reads {b}")),
    };
    let mut out = Vec::with_capacity(spec.inputs());
    for (c, plane) in planes.into_iter().enumerate() {
        let (mean, std) = spec.normalisation(c);
        out.extend(plane.into_iter().map(|v| ((f64::from(v) - mean) / std) as f32));
    }
    Ok(out)
}

/// Resamples one plane; bilinear samples at pixel centres (`align_corners = False`).
fn resize(plane: &[f32], h: usize, w: usize, oh: usize, ow: usize, how: Resize) -> Vec<f32> {
    let source = |o: usize, n_in: usize, n_out: usize| ((o as f64 + 0.5) * n_in as f64 / n_out as f64 - 0.5).max(0.0);
    let mut out = Vec::with_capacity(oh * ow);
    for oy in 0..oh {
        for ox in 0..ow {
            let (sy, sx) = (source(oy, h, oh), source(ox, w, ow));
            let v = match how {
                Resize::Nearest => {
                    let y = ((oy as f64 + 0.5) * h as f64 / oh as f64).floor() as usize;
                    let x = ((ox as f64 + 0.5) * w as f64 / ow as f64).floor() as usize;
                    plane[y.min(h - 1) * w + x.min(w - 1)]
                }
                Resize::Bilinear => {
                    let (y0, x0) = ((sy.floor() as usize).min(h - 1), (sx.floor() as usize).min(w - 1));
                    let (y1, x1) = ((y0 + 1).min(h - 1), (x0 + 1).min(w - 1));
                    let (fy, fx) = ((sy - y0 as f64) as f32, (sx - x0 as f64) as f32);
                    let top = plane[y0 * w + x0] * (1.0 - fx) + plane[y0 * w + x1] * fx;
                    let bottom = plane[y1 * w + x0] * (1.0 - fx) + plane[y1 * w + x1] * fx;
                    top * (1.0 - fy) + bottom * fy
                }
            };
            out.push(v);
        }
    }
    out
}

/// An image dataset's rows for an image study: the labels CSV through the
/// [`Encoder`], each kept row's image decoded and prepared.
pub(super) fn encode(
    dataset: &Dataset,
    source: &ImagesSource,
    folder: &Path,
    schema: &DataSchema,
    spec: &ImageInput,
) -> Result<Encoded, DataError> {
    let origin = dataset.connector.source().to_string();
    let labels = folder.join(&source.labels);
    if !labels.exists() {
        let empty = std::fs::read_dir(folder)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        return Err(if empty {
            DataError::Image {
                origin,
                file: folder.display().to_string(),
                reason: "the folder is empty: put the images and a labels CSV in it".into(),
            }
        } else {
            DataError::Read {
                origin,
                reason: format!("no labels CSV at {}", labels.display()),
            }
        });
    }
    let columns = dataset.connector.columns()?;
    let mut labels_only = schema.clone();
    labels_only.features.clear();
    labels_only.image = None;
    let mut encoder = Encoder::new(&dataset.config, &origin, &labels_only, &columns)?;
    // A patient may have several images: DP-SGD samples and clips per patient.
    encoder.allow_repeated = true;
    if !columns.iter().any(|(c, _)| c == &source.file_column) {
        return Err(DataError::MissingColumn {
            origin,
            column: source.file_column.clone(),
            columns: columns.iter().map(|(c, _)| c.as_str()).collect::<Vec<_>>().join(", "),
        });
    }
    let mut wanted = encoder.wanted.clone();
    wanted.push(source.file_column.clone());
    let allow_burned_in = source.burned_in_annotation == BurnedIn::Allow;
    let mut pixels = Vec::new();
    let mut formats: BTreeMap<(&'static str, usize, usize, usize), usize> = BTreeMap::new();
    dataset.connector.scan(&wanted, &mut |at, cells| {
        let (file, cells) = cells.split_last().unwrap_or((&Cell::Missing, &[]));
        let kept = encoder.y.len();
        encoder.push(at, cells)?;
        if encoder.y.len() == kept {
            return Ok(());
        }
        let name = match *file {
            Cell::Text(t) => t.trim().to_string(),
            Cell::Number(v) => number_text(v),
            _ => String::new(),
        };
        let outcome = if name.is_empty() {
            Err((format!("{at}"), "names no file".to_string()))
        } else {
            let path = folder.join(&name);
            decode(&path, spec, allow_burned_in)
                .and_then(|image| {
                    let input = prepare(&image, spec)?;
                    *formats
                        .entry((image.format, image.channels, image.height, image.width))
                        .or_default() += 1;
                    Ok(input)
                })
                .map_err(|reason| {
                    let reason = if path.exists() || path.is_dir() {
                        reason
                    } else {
                        format!("is named by the labels CSV ({at}) but does not exist")
                    };
                    (path.display().to_string(), reason)
                })
        };
        match outcome {
            Ok(input) => pixels.extend(input),
            Err(_) if source.bad_image == BadImage::Skip => {
                encoder.y.pop();
                if encoder.row_persons.len() > encoder.y.len() {
                    encoder.row_persons.pop();
                }
                encoder.drop_row("the image cannot be used");
            }
            Err((file, reason)) => {
                return Err(DataError::Image {
                    origin: origin.clone(),
                    file,
                    reason,
                });
            }
        }
        Ok(())
    })?;
    let mut encoded = encoder.finish()?;
    encoded.inputs = spec.input_names();
    encoded.x = pixels;
    // What the agent may log of the images: formats (DICOM transfer syntaxes) and shapes.
    let seen: Vec<String> = formats
        .iter()
        .map(|((format, c, h, w), n)| format!("{n} {format} {h}×{w}×{c}"))
        .collect();
    tracing::info!(dataset = %dataset.config.name, images = %seen.join(", "), "images read");
    Ok(encoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(size: [usize; 2]) -> ImageInput {
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

    fn image(h: usize, w: usize) -> Decoded {
        Decoded {
            channels: 1,
            height: h,
            width: w,
            values: (0..h * w).map(|v| v as f32).collect(),
            format: "PNG",
        }
    }

    #[test]
    fn bilinear_resize_samples_pixel_centres() {
        let mut s = spec([2, 2]);
        s.resize = Some(Resize::Bilinear);
        // A 4×4 ramp halved: each output is the mean of a 2×2 block.
        let out = prepare(&image(4, 4), &s).expect("resized");
        assert_eq!(out, vec![2.5, 4.5, 10.5, 12.5]);
        s.resize = Some(Resize::Nearest);
        assert_eq!(prepare(&image(4, 4), &s).expect("resized"), vec![5.0, 7.0, 13.0, 15.0]);
    }

    #[test]
    fn crop_channels_and_normalisation() {
        let mut s = spec([2, 2]);
        s.crop = Some([2, 2]);
        s.channels = 3;
        s.mean = vec![1.0, 0.0, 0.0];
        s.std = vec![2.0, 1.0, 1.0];
        let out = prepare(&image(4, 4), &s).expect("cropped");
        assert_eq!(&out[..4], &[2.0, 2.5, 4.0, 4.5]);
        assert_eq!(&out[4..8], &[5.0, 6.0, 9.0, 10.0]);
        let colour = Decoded {
            channels: 3,
            height: 1,
            width: 1,
            values: vec![1.0, 1.0, 1.0],
            format: "PNG",
        };
        let grey = prepare(&colour, &spec([1, 1])).expect("grey");
        assert!((grey[0] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn the_wrong_size_without_resize_is_refused() {
        let err = prepare(&image(4, 4), &spec([8, 8])).expect_err("no resize");
        assert!(err.contains("is 4×4, the study reads 8×8"), "{err}");
        let mut s = spec([8, 8]);
        s.crop = Some([8, 8]);
        s.resize = Some(Resize::Nearest);
        assert!(
            prepare(&image(4, 4), &s)
                .expect_err("crop")
                .contains("smaller than the study's crop")
        );
    }

    fn repo() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    fn config(folder: &Path, bad_image: BadImage) -> super::super::DatasetConfig {
        let mut config = super::super::DatasetConfig::csv("imgs", "", "label", None);
        config.path = PathBuf::new();
        config.images = Some(ImagesSource {
            folder: folder.to_path_buf(),
            labels: default_labels(),
            file_column: default_file_column(),
            bad_image,
            burned_in_annotation: BurnedIn::Refuse,
        });
        config
    }

    fn schema(classes: &[&str], image: ImageInput) -> DataSchema {
        DataSchema {
            dataset: "imgs".into(),
            label: "label".into(),
            classes: classes.iter().map(|c| c.to_string()).collect(),
            features: Vec::new(),
            categorical: Vec::new(),
            dates: Vec::new(),
            omop: None,
            scaling: None,
            image: Some(image),
        }
    }

    fn encode_folder(folder: &Path, bad_image: BadImage, image: ImageInput) -> Result<Encoded, DataError> {
        let dataset = Dataset::open(config(folder, bad_image), Path::new("/")).expect("valid entry");
        dataset.encode(&schema(&["a", "b"], image))
    }

    #[test]
    fn the_digits_folder_encodes_every_image() {
        let folder = repo().join("data/digits");
        let dataset = Dataset::open(config(&folder, BadImage::Refuse), Path::new("/")).expect("valid entry");
        let classes: Vec<String> = (0..10).map(|d| d.to_string()).collect();
        let classes: Vec<&str> = classes.iter().map(String::as_str).collect();
        let encoded = dataset.encode(&schema(&classes, spec([8, 8]))).expect("digits");
        assert_eq!(encoded.rows(), 1797);
        assert_eq!(encoded.x.len(), 1797 * 64);
        assert_eq!(encoded.inputs.len(), 64);
        assert!(encoded.x.iter().all(|v| (0.0..=1.0).contains(v)));
        assert!(encoded.y.iter().all(|c| (0.0..10.0).contains(c)));
        // A study over these files as a table of pixels is refused: images need [data.image].
        let mut table = schema(&classes, spec([8, 8]));
        table.image = None;
        table.features = vec!["file".into()];
        let err = dataset.encode(&table).expect_err("not an image study");
        assert!(err.to_string().contains("[data.image]"), "{err}");
    }

    /// A folder with `files` copied from the DICOM test files and a labels CSV of `rows`.
    fn folder_with(files: &[&str], rows: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        for f in files {
            std::fs::copy(repo().join("data/dicom").join(f), dir.path().join(f)).expect("copy");
        }
        let mut csv = "file,label\n".to_string();
        for (file, label) in rows {
            csv.push_str(&format!("{file},{label}\n"));
        }
        std::fs::write(dir.path().join("labels.csv"), csv).expect("labels");
        dir
    }

    #[test]
    fn a_truncated_dicom_refuses_the_dataset_or_is_skipped_by_name() {
        let dir = folder_with(
            &["MR_small.dcm", "MR_truncated.dcm"],
            &[("MR_small.dcm", "a"), ("MR_truncated.dcm", "b")],
        );
        let err = encode_folder(dir.path(), BadImage::Refuse, spec([64, 64])).expect_err("truncated");
        let text = err.to_string();
        assert!(
            text.contains("MR_truncated.dcm") && text.contains("shorter than the 8192"),
            "{text}"
        );
        assert_eq!(err.kind(), "an image of the dataset cannot be used");
        let kept = encode_folder(dir.path(), BadImage::Skip, spec([64, 64])).expect("skipped");
        assert_eq!(kept.rows(), 1);
        assert_eq!(kept.x.len(), 64 * 64);
        assert_eq!(kept.dropped, vec![("the image cannot be used".to_string(), 1)]);
    }

    /// Logs written while `f` runs, at every level.
    fn logs_of(f: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Buffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().expect("buffer").extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let bytes = buffer.0.lock().expect("buffer").clone();
        String::from_utf8(bytes).expect("utf-8 logs")
    }

    #[test]
    fn the_log_names_formats_and_shapes_never_files_or_tags() {
        // A file named like a patient, and one the site's policy skips.
        let dir = folder_with(&["MR_small.dcm", "MR_truncated.dcm"], &[]);
        std::fs::rename(dir.path().join("MR_small.dcm"), dir.path().join("DOE_JANE_1957.dcm")).expect("rename");
        std::fs::write(
            dir.path().join("labels.csv"),
            "file,label\nDOE_JANE_1957.dcm,a\nMR_truncated.dcm,b\n",
        )
        .expect("labels");
        let obj = dicom_object::open_file(dir.path().join("DOE_JANE_1957.dcm")).expect("dicom");
        let patient = super::super::dicom::text(&obj, dicom_dictionary_std::tags::PATIENT_NAME).expect("a name");
        assert!(!patient.trim().is_empty());
        let mut encoded = None;
        let logs = logs_of(|| encoded = Some(encode_folder(dir.path(), BadImage::Skip, spec([64, 64]))));
        assert_eq!(encoded.expect("ran").expect("one image kept").rows(), 1);
        assert!(logs.contains("images read"), "{logs}");
        assert!(logs.contains("1 Explicit VR Little Endian 64×64×1"), "{logs}");
        for secret in [
            "DOE_JANE",
            "MR_truncated",
            patient.trim(),
            &dir.path().display().to_string(),
        ] {
            assert!(!logs.contains(secret), "the log names {secret:?}: {logs}");
        }
    }

    #[test]
    fn a_labels_csv_naming_a_missing_file_is_refused_by_name() {
        let dir = folder_with(&["MR_small.dcm"], &[("MR_small.dcm", "a"), ("gone.dcm", "b")]);
        let err = encode_folder(dir.path(), BadImage::Refuse, spec([64, 64])).expect_err("missing");
        let text = err.to_string();
        assert!(
            text.contains("gone.dcm is named by the labels CSV (line 3) but does not exist"),
            "{text}"
        );
    }

    #[test]
    fn an_image_of_the_wrong_size_without_resize_is_refused() {
        let dir = folder_with(&["CT_small.dcm"], &[("CT_small.dcm", "a")]);
        let err = encode_folder(dir.path(), BadImage::Refuse, spec([64, 64])).expect_err("size");
        let text = err.to_string();
        assert!(
            text.contains("CT_small.dcm is 128×128, the study reads 64×64"),
            "{text}"
        );
        let mut resized = spec([64, 64]);
        resized.resize = Some(Resize::Bilinear);
        resized.window = Some(medfl_shared::manifest::Window {
            center: 40.0,
            width: 400.0,
        });
        let encoded = encode_folder(dir.path(), BadImage::Refuse, resized).expect("resized");
        assert_eq!(encoded.x.len(), 64 * 64);
        assert!(encoded.x.iter().all(|v| (0.0..=1.0).contains(v)));
    }

    #[test]
    fn a_patient_may_have_several_images_and_each_row_names_its_patient() {
        let dir = tempfile::tempdir().expect("tempdir");
        for f in ["MR_small.dcm", "MR_small_RLE.dcm"] {
            std::fs::copy(repo().join("data/dicom").join(f), dir.path().join(f)).expect("copy");
        }
        let rows = "file,label,patient\nMR_small.dcm,a,p1\nMR_small_RLE.dcm,b,p1\nMR_small.dcm,b,p2\n";
        std::fs::write(dir.path().join("labels.csv"), rows).expect("labels");
        let mut cfg = config(dir.path(), BadImage::Refuse);
        cfg.person_id = Some("patient".into());
        let dataset = Dataset::open(cfg, Path::new("/")).expect("valid entry");
        let encoded = dataset
            .encode(&schema(&["a", "b"], spec([64, 64])))
            .expect("two patients");
        assert_eq!(encoded.rows(), 3);
        assert_eq!(encoded.persons, vec![0, 0, 1]);
        // RLE and uncompressed decode to the same image.
        assert_eq!(encoded.x[..64 * 64], encoded.x[64 * 64..2 * 64 * 64]);
    }

    /// A JPEG file (the baseline stream inside the bundled DICOM JPEG, written alone) reads
    /// as RGB with pydicom's per-channel means; a folder named as an image (a series) is
    /// refused by name.
    #[test]
    fn a_jpeg_file_decodes_and_a_series_folder_is_refused() {
        let dcm = std::fs::read(repo().join("data/dicom/SC_rgb_jpeg_dcmtk.dcm")).expect("dicom");
        let start = dcm.windows(3).position(|w| w == [0xFF, 0xD8, 0xFF]).expect("SOI");
        let end = dcm.windows(2).rposition(|w| w == [0xFF, 0xD9]).expect("EOI") + 2;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("rgb.jpg");
        std::fs::write(&path, &dcm[start..end]).expect("jpg");
        let mut rgb = spec([100, 100]);
        rgb.channels = 3;
        let image = decode(&path, &rgb, false).expect("JPEG");
        assert_eq!(
            (image.format, image.channels, image.height, image.width),
            ("JPEG", 3, 100, 100)
        );
        for (c, want) in [127.72, 127.65, 127.83].iter().enumerate() {
            let values: Vec<f32> = image.values.iter().skip(c).step_by(3).copied().collect();
            let mean = values.iter().map(|v| f64::from(*v) * 255.0).sum::<f64>() / values.len() as f64;
            assert!((mean - want).abs() <= 1.0, "channel {c}: {mean} vs pydicom's {want}");
        }
        let err = decode(dir.path(), &rgb, false).expect_err("a folder");
        assert!(err.contains("is a folder (a whole series?)"), "{err}");
    }

    #[test]
    fn an_empty_folder_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = encode_folder(dir.path(), BadImage::Refuse, spec([8, 8])).expect_err("empty");
        assert!(err.to_string().contains("the folder is empty"), "{err}");
        let dir = folder_with(&[], &[]);
        let err = encode_folder(dir.path(), BadImage::Refuse, spec([8, 8])).expect_err("no rows");
        assert!(matches!(err, DataError::NoRows { .. }), "{err}");
    }
}
