//! Compression of whole initrd images, and decompression of kernel modules.
//!
//! Images are compressed with gzip or zstd, both of which Linux unpacks (`CONFIG_RD_GZIP`,
//! `CONFIG_RD_ZSTD`). Modules arrive as `.ko`, `.ko.gz`, `.ko.xz` or `.ko.zst`; which one is
//! told by the file's magic bytes, not its name, so a misnamed file still loads.

use std::io::{self, Read, Write};
use std::str::FromStr;

/// Errors compressing or decompressing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The name is not one of `none`, `gzip`, `zstd`.
    #[error("unknown compression {0:?} (expected none, gzip or zstd)")]
    Unknown(String),
    /// The encoder failed.
    #[error("{0} compression failed")]
    Compress(&'static str, #[source] io::Error),
    /// The data is damaged or truncated.
    #[error("{0} decompression failed")]
    Decompress(&'static str, #[source] io::Error),
}

/// How a whole initrd image is compressed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compression {
    /// Stored as is: the fastest to build and to boot when the image is small.
    #[default]
    None,
    /// gzip, which every kernel can unpack.
    Gzip,
    /// zstd: smaller than gzip and much faster to unpack.
    Zstd,
}

impl FromStr for Compression {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self, Error> {
        match name {
            "none" => Ok(Self::None),
            "gzip" | "gz" => Ok(Self::Gzip),
            "zstd" | "zst" => Ok(Self::Zstd),
            other => Err(Error::Unknown(other.to_owned())),
        }
    }
}

/// The zstd level for images: the library's default, fast at a good ratio.
const ZSTD_LEVEL: i32 = 3;

impl Compression {
    /// Compresses `data` into `out`. The output depends only on the input: gzip's header
    /// carries no time stamp or file name.
    pub fn compress(self, data: &[u8], out: &mut impl Write) -> Result<(), Error> {
        match self {
            Self::None => out.write_all(data).map_err(|e| Error::Compress("copy", e)),
            Self::Gzip => {
                let mut encoder =
                    flate2::write::GzEncoder::new(out, flate2::Compression::default());
                encoder
                    .write_all(data)
                    .and_then(|()| encoder.try_finish())
                    .map_err(|e| Error::Compress("gzip", e))
            }
            Self::Zstd => zstd::stream::copy_encode(data, out, ZSTD_LEVEL)
                .map_err(|e| Error::Compress("zstd", e)),
        }
    }
}

/// A compression format recognised by its magic bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Not compressed (or not in a format known here).
    Plain,
    /// gzip (`1f 8b`).
    Gzip,
    /// xz (`fd 37 7a 58 5a 00`).
    Xz,
    /// zstd (`28 b5 2f fd`).
    Zstd,
}

impl Format {
    /// The format of `data`, from its first bytes.
    pub fn detect(data: &[u8]) -> Self {
        if data.starts_with(&[0x1f, 0x8b]) {
            Self::Gzip
        } else if data.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
            Self::Xz
        } else if data.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Self::Zstd
        } else {
            Self::Plain
        }
    }
}

/// Returns `data` decompressed, or `None` when it is not compressed.
pub fn decompress(data: &[u8]) -> Result<Option<Vec<u8>>, Error> {
    let mut out = Vec::new();
    match Format::detect(data) {
        Format::Plain => return Ok(None),
        Format::Gzip => {
            let mut decoder = flate2::read::MultiGzDecoder::new(data);
            decoder
                .read_to_end(&mut out)
                .map_err(|e| Error::Decompress("gzip", e))?;
        }
        Format::Xz => {
            let mut decoder = liblzma::read::XzDecoder::new_multi_decoder(data);
            decoder
                .read_to_end(&mut out)
                .map_err(|e| Error::Decompress("xz", e))?;
        }
        Format::Zstd => {
            zstd::stream::copy_decode(data, &mut out).map_err(|e| Error::Decompress("zstd", e))?;
        }
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &[u8] =
        b"a kernel module, or something very much like one, repeated repeated repeated";

    fn roundtrip(c: Compression) -> Vec<u8> {
        let mut packed = Vec::new();
        c.compress(TEXT, &mut packed).unwrap();
        packed
    }

    #[test]
    fn names_parse() {
        assert_eq!("none".parse::<Compression>().unwrap(), Compression::None);
        assert_eq!("gzip".parse::<Compression>().unwrap(), Compression::Gzip);
        assert_eq!("zstd".parse::<Compression>().unwrap(), Compression::Zstd);
        assert!(matches!(
            "lz4".parse::<Compression>(),
            Err(Error::Unknown(_))
        ));
    }

    #[test]
    fn compressed_images_decompress_and_are_deterministic() {
        for c in [Compression::Gzip, Compression::Zstd] {
            let packed = roundtrip(c);
            assert_eq!(packed, roundtrip(c), "{c:?} is not deterministic");
            assert_eq!(decompress(&packed).unwrap().unwrap(), TEXT);
        }
        assert_eq!(roundtrip(Compression::None), TEXT);
        assert_eq!(decompress(TEXT).unwrap(), None);
    }

    #[test]
    fn xz_modules_decompress() {
        let mut packed = Vec::new();
        let mut encoder = liblzma::write::XzEncoder::new(&mut packed, 6);
        encoder.write_all(TEXT).unwrap();
        encoder.finish().unwrap();
        assert_eq!(Format::detect(&packed), Format::Xz);
        assert_eq!(decompress(&packed).unwrap().unwrap(), TEXT);
    }

    #[test]
    fn damaged_data_is_an_error() {
        let mut packed = roundtrip(Compression::Zstd);
        packed.truncate(packed.len() / 2);
        assert!(matches!(
            decompress(&packed),
            Err(Error::Decompress("zstd", _))
        ));
    }
}
