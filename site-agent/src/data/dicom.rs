//! DICOM files read with dicom-rs: one image (one frame) a file, its stored values and
//! what turns them into modality values. Nothing else of the file is kept: its tags
//! (names, dates, UIDs) never leave this module, and the agent logs only the transfer
//! syntax and the shape.
//!
//! Read: Implicit VR Little Endian, Explicit VR Little and Big Endian, RLE Lossless,
//! and JPEG (baseline, extended, lossless). Refused by name: any other transfer syntax,
//! multi-frame images, pixel data shorter than the header says, and images marked with
//! burned-in annotation (0028,0301 = YES, which may show a patient's name) unless the
//! dataset allows them.

use std::path::Path;

use dicom_dictionary_std::tags;
use dicom_object::{FileDicomObject, InMemDicomObject, OpenFileOptions};
use dicom_pixeldata::PixelDecoder;

/// The transfer syntaxes medfl decodes: UID and name.
pub const SUPPORTED: [(&str, &str); 8] = [
    ("1.2.840.10008.1.2", "Implicit VR Little Endian"),
    ("1.2.840.10008.1.2.1", "Explicit VR Little Endian"),
    ("1.2.840.10008.1.2.2", "Explicit VR Big Endian"),
    ("1.2.840.10008.1.2.5", "RLE Lossless"),
    ("1.2.840.10008.1.2.4.50", "JPEG Baseline (Process 1)"),
    ("1.2.840.10008.1.2.4.51", "JPEG Extended (Process 2 & 4)"),
    ("1.2.840.10008.1.2.4.57", "JPEG Lossless, Non-Hierarchical (Process 14)"),
    (
        "1.2.840.10008.1.2.4.70",
        "JPEG Lossless, Non-Hierarchical, First-Order Prediction",
    ),
];

/// Well-known transfer syntaxes medfl does not decode, named in the refusal.
const KNOWN_UNSUPPORTED: [(&str, &str); 8] = [
    ("1.2.840.10008.1.2.1.99", "Deflated Explicit VR Little Endian"),
    ("1.2.840.10008.1.2.4.80", "JPEG-LS Lossless"),
    ("1.2.840.10008.1.2.4.81", "JPEG-LS Near-Lossless"),
    ("1.2.840.10008.1.2.4.90", "JPEG 2000 (Lossless Only)"),
    ("1.2.840.10008.1.2.4.91", "JPEG 2000"),
    ("1.2.840.10008.1.2.4.201", "High-Throughput JPEG 2000 (Lossless Only)"),
    ("1.2.840.10008.1.2.4.203", "High-Throughput JPEG 2000"),
    ("1.2.840.10008.1.2.4.110", "JPEG XL Lossless"),
];

/// One decoded DICOM image.
#[derive(Debug, Clone, PartialEq)]
pub struct DicomImage {
    /// The transfer syntax's name (what the agent may log).
    pub transfer_syntax: &'static str,
    pub rows: usize,
    pub columns: usize,
    /// Samples per pixel: 1 (MONOCHROME1/2) or 3 (colour, decoded to RGB).
    pub samples: usize,
    /// The stored values, row-major, a pixel's samples together; before rescale.
    pub stored: Vec<i32>,
    pub bits_stored: u16,
    pub signed: bool,
    /// Rescale slope and intercept (modality value = stored × slope + intercept).
    pub slope: f64,
    pub intercept: f64,
    /// MONOCHROME1: the lowest value is displayed white.
    pub monochrome1: bool,
}

impl DicomImage {
    /// The modality values (Hounsfield units for CT), row-major; MONOCHROME1 is
    /// inverted within the stored range so that, as in MONOCHROME2, higher is brighter:
    /// `s ↦ lo + hi − s` for the stored range `[lo, hi]` that bits stored and the pixel
    /// representation allow (PS3.3 C.7.6.3.1.2), then rescaled.
    pub fn modality_values(&self) -> Vec<f32> {
        let (lo, hi) = self.stored_range();
        self.stored
            .iter()
            .map(|&s| {
                let s = if self.monochrome1 {
                    lo + hi - i64::from(s)
                } else {
                    i64::from(s)
                };
                (s as f64 * self.slope + self.intercept) as f32
            })
            .collect()
    }

    /// The range of stored values the header allows.
    pub fn stored_range(&self) -> (i64, i64) {
        let bits = u32::from(self.bits_stored.clamp(1, 32));
        if self.signed {
            (-(1i64 << (bits - 1)), (1i64 << (bits - 1)) - 1)
        } else {
            (0, (1i64 << bits) - 1)
        }
    }
}

/// Why a DICOM file cannot be used; the caller names the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DicomError {
    #[error("not a DICOM file medfl can parse ({0})")]
    Parse(String),
    #[error(
        "its pixel data holds {available} bytes, shorter than the {expected} its header says ({rows} rows × {columns} columns × {samples} samples × {bits} bits): the file is truncated or its group 0028 is wrong"
    )]
    Truncated {
        available: u64,
        expected: u64,
        rows: u64,
        columns: u64,
        samples: u64,
        bits: u64,
    },
    #[error(
        "its transfer syntax {0} is not one medfl decodes (it reads Implicit and Explicit VR Little Endian, Explicit VR Big Endian, RLE Lossless and JPEG baseline, extended and lossless)"
    )]
    TransferSyntax(String),
    #[error("it has {0} frames: multi-frame images are not supported yet (give one file a frame)")]
    MultiFrame(u32),
    #[error(
        "it is marked with burned-in annotation (0028,0301 = YES), which may show who the patient is; the dataset refuses such images (allow them with burned_in_annotation = \"allow\")"
    )]
    BurnedIn,
    #[error("it has no pixel data")]
    NoPixels,
    #[error("its pixel data cannot be decoded ({0})")]
    Decode(String),
    #[error("it has {0} bits allocated a sample; medfl reads 8, 16 and 32")]
    Bits(u16),
}

pub(super) fn text(obj: &InMemDicomObject, tag: dicom_object::Tag) -> Option<String> {
    obj.element_opt(tag)
        .ok()
        .flatten()
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches(['\0', ' ']).trim().to_string())
}

fn number(obj: &InMemDicomObject, tag: dicom_object::Tag) -> Option<f64> {
    text(obj, tag).and_then(|s| s.split('\\').next()?.trim().parse().ok())
}

/// Reads and decodes the one image of a DICOM file. `allow_burned_in` lets images
/// marked with burned-in annotation through.
pub fn read(path: &Path, allow_burned_in: bool) -> Result<DicomImage, DicomError> {
    let obj = match dicom_object::open_file(path) {
        Ok(obj) => obj,
        Err(e) => return Err(diagnose(path).unwrap_or_else(|| DicomError::Parse(e.to_string()))),
    };
    let uid = obj.meta().transfer_syntax().trim_end_matches(['\0', ' ']).to_string();
    let Some(&(_, transfer_syntax)) = SUPPORTED.iter().find(|(u, _)| *u == uid) else {
        let name = KNOWN_UNSUPPORTED
            .iter()
            .find(|(u, _)| *u == uid)
            .map_or_else(|| uid.clone(), |(u, n)| format!("{n} ({u})"));
        return Err(DicomError::TransferSyntax(name));
    };
    let frames = number(&obj, tags::NUMBER_OF_FRAMES).unwrap_or(1.0);
    if frames > 1.0 {
        return Err(DicomError::MultiFrame(frames as u32));
    }
    if !allow_burned_in && text(&obj, tags::BURNED_IN_ANNOTATION).is_some_and(|v| v.eq_ignore_ascii_case("YES")) {
        return Err(DicomError::BurnedIn);
    }
    if obj.element_opt(tags::PIXEL_DATA).ok().flatten().is_none() {
        return Err(DicomError::NoPixels);
    }
    let photometric = text(&obj, tags::PHOTOMETRIC_INTERPRETATION).unwrap_or_default();
    check_length(&obj, transfer_syntax)?;
    let px = obj.decode_pixel_data().map_err(|e| DicomError::Decode(e.to_string()))?;
    let rows = px.rows() as usize;
    let columns = px.columns() as usize;
    let samples = usize::from(px.samples_per_pixel());
    let bits_allocated = px.bits_allocated();
    let bits_stored = px.bits_stored().min(bits_allocated);
    let signed = px.pixel_representation() == dicom_pixeldata::PixelRepresentation::Signed;
    let data = px.data();
    let n = rows * columns * samples;
    let width = usize::from(bits_allocated / 8);
    if !matches!(bits_allocated, 8 | 16 | 32) {
        return Err(DicomError::Bits(bits_allocated));
    }
    if data.len() < n * width {
        return Err(DicomError::Truncated {
            available: data.len() as u64,
            expected: (n * width) as u64,
            rows: rows as u64,
            columns: columns as u64,
            samples: samples as u64,
            bits: u64::from(bits_allocated),
        });
    }
    // Decoded samples are in native byte order; only the low `bits_stored` bits are the
    // value, sign-extended when the pixel representation is signed.
    let shift = 32 - u32::from(bits_stored.max(1));
    let stored = data[..n * width]
        .chunks_exact(width)
        .map(|b| {
            let raw: u32 = match width {
                1 => u32::from(b[0]),
                2 => u32::from(u16::from_ne_bytes([b[0], b[1]])),
                _ => u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
            };
            if signed {
                ((raw << shift) as i32) >> shift
            } else {
                ((raw << shift) >> shift) as i32
            }
        })
        .collect();
    let (slope, intercept) = px
        .rescale()
        .ok()
        .and_then(|r| r.first().map(|r| (r.slope, r.intercept)))
        .unwrap_or((1.0, 0.0));
    Ok(DicomImage {
        transfer_syntax,
        rows,
        columns,
        samples,
        stored,
        bits_stored,
        signed,
        slope,
        intercept,
        monochrome1: photometric.eq_ignore_ascii_case("MONOCHROME1"),
    })
}

/// An uncompressed file's pixel data must hold what rows × columns × samples × bits
/// say (dicom-rs would read on past a short value, or pad it).
fn check_length(obj: &FileDicomObject<InMemDicomObject>, transfer_syntax: &str) -> Result<(), DicomError> {
    if !transfer_syntax.contains("Endian") {
        return Ok(());
    }
    let Ok(Some(element)) = obj.element_opt(tags::PIXEL_DATA) else {
        return Ok(());
    };
    let Ok(bytes) = element.to_bytes() else { return Ok(()) };
    let expected = expected_bytes(obj);
    match expected {
        Some((expected, rows, columns, samples, bits)) if (bytes.len() as u64) < expected => {
            Err(DicomError::Truncated {
                available: bytes.len() as u64,
                expected,
                rows,
                columns,
                samples,
                bits,
            })
        }
        _ => Ok(()),
    }
}

/// What the image header says the pixel data must hold: bytes, rows, columns, samples
/// per pixel and bits allocated.
fn expected_bytes(obj: &InMemDicomObject) -> Option<(u64, u64, u64, u64, u64)> {
    let rows = number(obj, tags::ROWS)? as u64;
    let columns = number(obj, tags::COLUMNS)? as u64;
    let samples = number(obj, tags::SAMPLES_PER_PIXEL).unwrap_or(1.0) as u64;
    let bits = number(obj, tags::BITS_ALLOCATED)? as u64;
    let frames = number(obj, tags::NUMBER_OF_FRAMES).unwrap_or(1.0).max(1.0) as u64;
    Some((
        (rows * columns * samples * frames * bits).div_ceil(8),
        rows,
        columns,
        samples,
        bits,
    ))
}

/// Why a file dicom-rs could not read fails, where the header tells: its pixel data
/// element says more bytes than the file holds after it.
fn diagnose(path: &Path) -> Option<DicomError> {
    let header = OpenFileOptions::new()
        .read_until(tags::PIXEL_DATA)
        .open_file(path)
        .ok()?;
    let (expected, rows, columns, samples, bits) = expected_bytes(&header)?;
    let raw = std::fs::read(path).ok()?;
    // The pixel data element (7FE0,0010) is the last top-level one: find its tag from
    // the end, little- or big-endian, then its value's start after the VR and length.
    let le = [0xE0, 0x7F, 0x10, 0x00];
    let be = [0x7F, 0xE0, 0x00, 0x10];
    let at = raw.windows(4).rposition(|w| w == le || w == be)?;
    let explicit = raw.get(at + 4..at + 6).is_some_and(|vr| vr == b"OW" || vr == b"OB");
    let start = if explicit { at + 12 } else { at + 8 };
    let available = raw.len().checked_sub(start)? as u64;
    (available < expected).then_some(DicomError::Truncated {
        available,
        expected,
        rows,
        columns,
        samples,
        bits,
    })
}

/// Writes synthetic `side × side` CT-like images for benchmarks (the bundled files are
/// under 40 KB): 16-bit signed in Explicit VR Little Endian and in Explicit VR Big
/// Endian, and 8-bit in JPEG Baseline (encoded by dicom-rs). Returns each file's
/// name and path.
pub fn synthesize(dir: &Path, side: usize) -> Result<Vec<(String, std::path::PathBuf)>, String> {
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_object::FileMetaTableBuilder;
    use dicom_pixeldata::Transcode;
    use dicom_transfer_syntax_registry::entries;
    let image = |bits: u16| {
        let mut obj = InMemDicomObject::new_empty();
        let put = |obj: &mut InMemDicomObject, tag, vr, value: PrimitiveValue| {
            obj.put(DataElement::new(tag, vr, value));
        };
        put(
            &mut obj,
            tags::SOP_CLASS_UID,
            VR::UI,
            "1.2.840.10008.5.1.4.1.1.2".into(),
        );
        put(&mut obj, tags::SOP_INSTANCE_UID, VR::UI, "2.25.1".into());
        put(&mut obj, tags::MODALITY, VR::CS, "CT".into());
        put(&mut obj, tags::SAMPLES_PER_PIXEL, VR::US, PrimitiveValue::from(1u16));
        put(&mut obj, tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2".into());
        put(&mut obj, tags::ROWS, VR::US, PrimitiveValue::from(side as u16));
        put(&mut obj, tags::COLUMNS, VR::US, PrimitiveValue::from(side as u16));
        put(&mut obj, tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(bits));
        put(&mut obj, tags::BITS_STORED, VR::US, PrimitiveValue::from(bits));
        put(&mut obj, tags::HIGH_BIT, VR::US, PrimitiveValue::from(bits - 1));
        let signed = u16::from(bits == 16);
        put(
            &mut obj,
            tags::PIXEL_REPRESENTATION,
            VR::US,
            PrimitiveValue::from(signed),
        );
        put(&mut obj, tags::RESCALE_INTERCEPT, VR::DS, "-1024".into());
        put(&mut obj, tags::RESCALE_SLOPE, VR::DS, "1".into());
        // A smooth disc with texture: something a codec does not find trivially.
        let value = |y: usize, x: usize| {
            let (dy, dx) = (y as f64 - side as f64 / 2.0, x as f64 - side as f64 / 2.0);
            let r = (dy * dy + dx * dx).sqrt() / side as f64;
            (1.0 - r).max(0.0) * (0.8 + 0.2 * ((x * 7 + y * 13) % 17) as f64 / 17.0)
        };
        if bits == 16 {
            let px: Vec<i16> = (0..side * side)
                .map(|i| (value(i / side, i % side) * 2000.0) as i16)
                .collect();
            put(&mut obj, tags::PIXEL_DATA, VR::OW, PrimitiveValue::I16(px.into()));
        } else {
            let px: Vec<u8> = (0..side * side)
                .map(|i| (value(i / side, i % side) * 255.0) as u8)
                .collect();
            put(&mut obj, tags::PIXEL_DATA, VR::OB, PrimitiveValue::U8(px.into()));
        }
        obj
    };
    let meta = |ts: &str| {
        FileMetaTableBuilder::new()
            .media_storage_sop_class_uid("1.2.840.10008.5.1.4.1.1.2")
            .media_storage_sop_instance_uid("2.25.1")
            .transfer_syntax(ts)
            .build()
            .map_err(|e| e.to_string())
    };
    let mut out = Vec::new();
    for (name, ts) in [
        ("explicit_le", entries::EXPLICIT_VR_LITTLE_ENDIAN.uid()),
        ("big_endian", entries::EXPLICIT_VR_BIG_ENDIAN.uid()),
    ] {
        let path = dir.join(format!("{name}.dcm"));
        image(16)
            .with_exact_meta(meta(ts)?)
            .write_to_file(&path)
            .map_err(|e| e.to_string())?;
        out.push((name.to_string(), path));
    }
    let mut jpeg = image(8).with_exact_meta(meta(entries::EXPLICIT_VR_LITTLE_ENDIAN.uid())?);
    jpeg.transcode(&entries::JPEG_BASELINE.erased())
        .map_err(|e| e.to_string())?;
    let path = dir.join("jpeg_baseline.dcm");
    jpeg.write_to_file(&path).map_err(|e| e.to_string())?;
    out.push(("jpeg_baseline".to_string(), path));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use dicom_object::DefaultDicomObject;
    use dicom_object::mem::InMemElement;

    use super::*;

    /// The DICOM test files: `../shared/data/dicom/` beside the repository when it is
    /// there (it may hold more than the copy), else the copy in `data/dicom/`.
    fn folder() -> PathBuf {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let beside = root.join("../shared/data/dicom");
        if beside.join("reference.json").exists() {
            beside
        } else {
            root.join("data/dicom")
        }
    }

    fn reference() -> serde_json::Value {
        let text = std::fs::read_to_string(folder().join("reference.json")).expect("reference.json");
        serde_json::from_str(&text).expect("reference.json is JSON")
    }

    /// SHA-256 over the stored values as little-endian int32, row-major (as the
    /// reference computes it with pydicom).
    fn sha256(values: &[i32]) -> String {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        medfl_shared::sha256_hex(&bytes)
    }

    /// Checks a decoded image against the reference entry for `name`.
    fn check(image: &DicomImage, name: &str) {
        let r = &reference()[name];
        assert_eq!(image.rows as u64, r["rows"].as_u64().expect("rows"), "{name}");
        assert_eq!(image.columns as u64, r["columns"].as_u64().expect("columns"), "{name}");
        let min = *image.stored.iter().min().expect("values");
        let max = *image.stored.iter().max().expect("values");
        assert_eq!(i64::from(min), r["stored_min"].as_i64().expect("min"), "{name}");
        assert_eq!(i64::from(max), r["stored_max"].as_i64().expect("max"), "{name}");
        let mean = image.stored.iter().map(|&v| f64::from(v)).sum::<f64>() / image.stored.len() as f64;
        assert!(
            (mean - r["stored_mean"].as_f64().expect("mean")).abs() < 1e-9,
            "{name}: mean {mean}"
        );
        let first: Vec<i64> = r["stored_first_row_first_8"]
            .as_array()
            .expect("first values")
            .iter()
            .map(|v| v.as_i64().expect("int"))
            .collect();
        let got: Vec<i64> = image.stored[..8].iter().map(|&v| i64::from(v)).collect();
        assert_eq!(got, first, "{name}");
        assert_eq!(
            sha256(&image.stored),
            r["stored_sha256"].as_str().expect("sha"),
            "{name}"
        );
        assert_eq!(image.slope, r["rescale_slope"].as_f64().expect("slope"), "{name}");
        assert_eq!(
            image.intercept,
            r["rescale_intercept"].as_f64().expect("intercept"),
            "{name}"
        );
        assert_eq!(image.signed, r["pixel_representation"].as_u64() == Some(1), "{name}");
        assert_eq!(
            image.transfer_syntax,
            r["transfer_syntax"].as_str().expect("ts"),
            "{name}"
        );
    }

    fn read_ok(name: &str) -> DicomImage {
        read(&folder().join(name), false).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    #[test]
    fn ct_small_equals_pydicom_and_rescales_to_hounsfield_units() {
        let image = read_ok("CT_small.dcm");
        check(&image, "CT_small.dcm");
        let hu = image.modality_values();
        assert_eq!(hu[0], 175.0 - 1024.0);
    }

    #[test]
    fn mr_small_equals_pydicom() {
        check(&read_ok("MR_small.dcm"), "MR_small.dcm");
    }

    #[test]
    fn rle_lossless_equals_pydicom() {
        check(&read_ok("MR_small_RLE.dcm"), "MR_small_RLE.dcm");
    }

    #[test]
    fn jpeg_baseline_means_within_one_grey_level_of_pydicom() {
        let name = "SC_rgb_jpeg_dcmtk.dcm";
        let image = read_ok(name);
        let r = &reference()[name];
        let shape: Vec<u64> = r["decoded_shape"]
            .as_array()
            .expect("shape")
            .iter()
            .filter_map(|v| v.as_u64())
            .collect();
        assert_eq!(
            shape,
            vec![image.rows as u64, image.columns as u64, image.samples as u64]
        );
        assert_eq!(image.transfer_syntax, r["transfer_syntax"].as_str().expect("ts"));
        let want = r["decoded_mean_per_channel"].as_array().expect("means");
        for (c, want) in want.iter().enumerate() {
            let values: Vec<f64> = image.stored.iter().skip(c).step_by(3).map(|&v| f64::from(v)).collect();
            let mean = values.iter().sum::<f64>() / values.len() as f64;
            let want = want.as_f64().expect("mean");
            assert!((mean - want).abs() <= 1.0, "channel {c}: {mean} vs pydicom's {want}");
        }
    }

    #[test]
    fn truncated_pixel_data_is_refused_with_the_sizes() {
        let err = read(&folder().join("MR_truncated.dcm"), false).expect_err("truncated");
        assert!(
            matches!(err, DicomError::Truncated { expected: 8192, available, .. } if available < 8192),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains("shorter than the 8192") && text.contains("64 rows × 64 columns"),
            "{text}"
        );
    }

    /// `MR_small.dcm` rewritten by dicom-rs in `transfer_syntax`, with `edit` applied.
    fn rewrite(
        dir: &Path,
        transfer_syntax: &dicom_transfer_syntax_registry::TransferSyntax<impl Sized, impl Sized, impl Sized>,
        file: &str,
        edit: impl FnOnce(&mut DefaultDicomObject),
    ) -> PathBuf {
        let mut obj = dicom_object::open_file(folder().join("MR_small.dcm")).expect("MR_small");
        edit(&mut obj);
        obj.meta_mut().set_transfer_syntax(transfer_syntax);
        let path = dir.join(file);
        obj.write_to_file(&path).expect("write");
        path
    }

    #[test]
    fn implicit_vr_and_big_endian_equal_pydicom() {
        use dicom_transfer_syntax_registry::entries;
        let dir = tempfile::tempdir().expect("tempdir");
        let implicit = rewrite(dir.path(), &entries::IMPLICIT_VR_LITTLE_ENDIAN, "implicit.dcm", |_| {});
        let big = rewrite(dir.path(), &entries::EXPLICIT_VR_BIG_ENDIAN, "big.dcm", |_| {});
        for (path, ts) in [(implicit, "Implicit VR Little Endian"), (big, "Explicit VR Big Endian")] {
            let mut image = read(&path, false).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(image.transfer_syntax, ts);
            image.transfer_syntax = "Explicit VR Little Endian";
            check(&image, "MR_small.dcm");
        }
    }

    #[test]
    fn monochrome1_is_inverted_within_the_stored_range() {
        use dicom_core::{VR, value::PrimitiveValue};
        use dicom_transfer_syntax_registry::entries;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = rewrite(dir.path(), &entries::EXPLICIT_VR_LITTLE_ENDIAN, "mono1.dcm", |obj| {
            obj.put(InMemElement::new(
                tags::PHOTOMETRIC_INTERPRETATION,
                VR::CS,
                PrimitiveValue::from("MONOCHROME1"),
            ));
        });
        let image = read(&path, false).expect("MONOCHROME1");
        assert!(image.monochrome1);
        check(&image, "MR_small.dcm");
        let (lo, hi) = image.stored_range();
        assert_eq!((lo, hi), (-32768, 32767));
        for (v, s) in image.modality_values().iter().zip(&image.stored) {
            assert_eq!(f64::from(*v), (lo + hi - i64::from(*s)) as f64);
        }
    }

    #[test]
    fn an_unsupported_transfer_syntax_is_named() {
        use dicom_transfer_syntax_registry::entries;
        let dir = tempfile::tempdir().expect("tempdir");
        // The header says JPEG 2000; the refusal comes before any pixel is decoded.
        let path = rewrite(
            dir.path(),
            &entries::JPEG_2000_IMAGE_COMPRESSION_LOSSLESS_ONLY,
            "j2k.dcm",
            |_| {},
        );
        let err = read(&path, false).expect_err("JPEG 2000");
        assert!(
            err.to_string()
                .contains("JPEG 2000 (Lossless Only) (1.2.840.10008.1.2.4.90)"),
            "{err}"
        );
    }

    #[test]
    fn burned_in_annotation_is_refused_unless_allowed() {
        use dicom_core::{VR, value::PrimitiveValue};
        use dicom_transfer_syntax_registry::entries;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = rewrite(dir.path(), &entries::EXPLICIT_VR_LITTLE_ENDIAN, "burned.dcm", |obj| {
            obj.put(InMemElement::new(
                tags::BURNED_IN_ANNOTATION,
                VR::CS,
                PrimitiveValue::from("YES"),
            ));
        });
        assert_eq!(read(&path, false).expect_err("burned in"), DicomError::BurnedIn);
        check(&read(&path, true).expect("allowed"), "MR_small.dcm");
    }

    #[test]
    fn synthesized_files_decode_to_what_was_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = synthesize(dir.path(), 64).expect("synthesized");
        let le = read(&files[0].1, false).expect("little endian");
        let be = read(&files[1].1, false).expect("big endian");
        assert_eq!((le.rows, le.columns, le.signed), (64, 64, true));
        assert_eq!(le.stored, be.stored);
        assert_eq!(le.modality_values()[0], le.stored[0] as f32 - 1024.0);
        let jpeg = read(&files[2].1, false).expect("JPEG baseline");
        assert_eq!(jpeg.transfer_syntax, "JPEG Baseline (Process 1)");
        assert_eq!(jpeg.stored.len(), 64 * 64);
    }

    #[test]
    fn multi_frame_images_are_refused() {
        use dicom_core::{VR, value::PrimitiveValue};
        use dicom_transfer_syntax_registry::entries;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = rewrite(dir.path(), &entries::EXPLICIT_VR_LITTLE_ENDIAN, "frames.dcm", |obj| {
            obj.put(InMemElement::new(
                tags::NUMBER_OF_FRAMES,
                VR::IS,
                PrimitiveValue::from("2"),
            ));
        });
        assert_eq!(read(&path, false).expect_err("frames"), DicomError::MultiFrame(2));
    }
}
