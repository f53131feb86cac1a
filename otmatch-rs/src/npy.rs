//! Just enough of numpy's `.npy` format for the CLI: C-order arrays of `f32`,
//! `i64` and `bool`, read straight into a typed buffer (no second copy) and
//! written atomically (a reader sees the old file or the new one, never half).

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// An element type that `.npy` files may hold.
pub trait Element: Copy + Default + 'static {
    /// numpy's type string (little-endian).
    const DESCR: &'static str;
    /// What a user would call it, for error messages.
    const NAME: &'static str;
    /// Decodes one little-endian element.
    fn from_le(bytes: &[u8]) -> Self;
    /// Encodes one element little-endian.
    fn to_le(self, out: &mut Vec<u8>);
}

impl Element for f32 {
    const DESCR: &'static str = "<f4";
    const NAME: &'static str = "float32";
    fn from_le(b: &[u8]) -> Self {
        f32::from_le_bytes(b.try_into().expect("4 bytes"))
    }
    fn to_le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

impl Element for i64 {
    const DESCR: &'static str = "<i8";
    const NAME: &'static str = "int64";
    fn from_le(b: &[u8]) -> Self {
        i64::from_le_bytes(b.try_into().expect("8 bytes"))
    }
    fn to_le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

impl Element for bool {
    const DESCR: &'static str = "|b1";
    const NAME: &'static str = "bool";
    fn from_le(b: &[u8]) -> Self {
        b[0] != 0
    }
    fn to_le(self, out: &mut Vec<u8>) {
        out.push(u8::from(self));
    }
}

fn bad(path: &Path, msg: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}: {msg}", path.display()),
    )
}

/// Reads a C-order `.npy` array of `T`: (shape, values).
pub fn read<T: Element>(path: impl AsRef<Path>) -> io::Result<(Vec<usize>, Vec<T>)> {
    let path = path.as_ref();
    let mut f = File::open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    let mut magic = [0u8; 8];
    f.read_exact(&mut magic)
        .map_err(|_| bad(path, "not a .npy file (too short)"))?;
    if &magic[..6] != b"\x93NUMPY" {
        return Err(bad(path, "not a .npy file (bad magic bytes)"));
    }
    let header_len = match magic[6] {
        1 => {
            let mut b = [0u8; 2];
            f.read_exact(&mut b)
                .map_err(|_| bad(path, "truncated header"))?;
            usize::from(u16::from_le_bytes(b))
        }
        2 | 3 => {
            let mut b = [0u8; 4];
            f.read_exact(&mut b)
                .map_err(|_| bad(path, "truncated header"))?;
            u32::from_le_bytes(b) as usize
        }
        v => return Err(bad(path, format!("unsupported .npy version {v}"))),
    };
    if header_len > 1 << 20 {
        return Err(bad(path, "header is implausibly long"));
    }
    let mut header = vec![0u8; header_len];
    f.read_exact(&mut header)
        .map_err(|_| bad(path, "truncated header"))?;
    let header = String::from_utf8_lossy(&header);
    let descr = field(&header, "descr").ok_or_else(|| bad(path, "header has no 'descr'"))?;
    let descr = descr.trim_matches(|c| c == '\'' || c == '"');
    let native_ok =
        descr == T::DESCR || (T::DESCR.starts_with('|') && descr.ends_with(&T::DESCR[1..]));
    if !native_ok {
        return Err(bad(
            path,
            format!(
                "expected {} ('{}'), found dtype '{descr}'; convert it with .astype(np.{})",
                T::NAME,
                T::DESCR,
                T::NAME
            ),
        ));
    }
    let fortran = field(&header, "fortran_order")
        .ok_or_else(|| bad(path, "header has no 'fortran_order'"))?;
    if fortran.trim() != "False" {
        return Err(bad(
            path,
            "array is in Fortran order; save a C-contiguous array (np.ascontiguousarray)",
        ));
    }
    let shape = parse_shape(&header).ok_or_else(|| bad(path, "header has no readable 'shape'"))?;
    let count = shape
        .iter()
        .try_fold(1usize, |a, &b| a.checked_mul(b))
        .ok_or_else(|| bad(path, "shape overflows"))?;
    let size = std::mem::size_of::<T>();
    let data_len = f.metadata()?.len();
    let expect = (count * size) as u64;
    let pos = (10 + header_len + if magic[6] == 1 { 0 } else { 2 }) as u64;
    if data_len.saturating_sub(pos) != expect {
        return Err(bad(
            path,
            format!(
                "shape {shape:?} needs {expect} data bytes, the file has {}",
                data_len.saturating_sub(pos)
            ),
        ));
    }
    let mut values = vec![T::default(); count];
    if cfg!(target_endian = "little") && T::DESCR != "|b1" {
        // SAFETY: f32/i64 have no invalid bit patterns and, on a little-endian
        // host, their in-memory bytes are exactly the file's bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(values.as_mut_ptr().cast::<u8>(), count * size)
        };
        f.read_exact(bytes)
            .map_err(|_| bad(path, "truncated data"))?;
    } else {
        let mut raw = vec![0u8; count * size];
        f.read_exact(&mut raw)
            .map_err(|_| bad(path, "truncated data"))?;
        for (v, b) in values.iter_mut().zip(raw.chunks_exact(size)) {
            *v = T::from_le(b);
        }
    }
    Ok((shape, values))
}

/// The raw text of `key`'s value in a numpy header dict (up to the next comma at depth 0).
fn field<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let start = header.find(&format!("'{key}'"))? + key.len() + 2;
    let rest = header[start..].trim_start().strip_prefix(':')?.trim_start();
    let mut depth = 0;
    for (i, c) in rest.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' | '}' if depth == 0 => return Some(rest[..i].trim()),
            _ => {}
        }
    }
    None
}

fn parse_shape(header: &str) -> Option<Vec<usize>> {
    let raw = field(header, "shape")?;
    let inner = raw.strip_prefix('(')?.strip_suffix(')')?;
    inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse().ok())
        .collect()
}

/// Writes `values` as a C-order `.npy` array of `shape`, atomically.
pub fn write<T: Element>(path: impl AsRef<Path>, shape: &[usize], values: &[T]) -> io::Result<()> {
    stage(path, shape, values)?.commit()
}

/// Writes `values` to a temporary sibling of `path`; [`Staged::commit`] renames it
/// into place. Several outputs staged first and committed together are written
/// all or none: a failure while staging any of them leaves every target untouched.
pub fn stage<T: Element>(
    path: impl AsRef<Path>,
    shape: &[usize],
    values: &[T],
) -> io::Result<Staged> {
    let count: usize = shape.iter().product();
    if count != values.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("shape {shape:?} needs {count} values, got {}", values.len()),
        ));
    }
    let dims = match shape {
        [one] => format!("({one},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {dims}, }}",
        T::DESCR
    );
    // Magic (6) + version (2) + length (2) + header + '\n' is a multiple of 64.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    stage_atomic(path.as_ref(), |w| {
        w.write_all(b"\x93NUMPY\x01\x00")?;
        w.write_all(&(header.len() as u16).to_le_bytes())?;
        w.write_all(header.as_bytes())?;
        let mut buf = Vec::with_capacity(1 << 16);
        for chunk in values.chunks(1 << 13) {
            buf.clear();
            for &v in chunk {
                v.to_le(&mut buf);
            }
            w.write_all(&buf)?;
        }
        Ok(())
    })
}

/// A complete output in a temporary file beside its target, not yet in place.
/// Dropped without [`Staged::commit`], it removes its temporary file.
#[derive(Debug)]
pub struct Staged {
    tmp: PathBuf,
    path: PathBuf,
    dir: PathBuf,
    done: bool,
}

impl Staged {
    /// Renames the temporary file over the target.
    pub fn commit(mut self) -> io::Result<()> {
        fs::rename(&self.tmp, &self.path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.path.display())))?;
        self.done = true;
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Checks, before any work, that `path` can take an output file: its folder exists
/// and it is not itself a folder. (A run should not compute for minutes and then
/// fail on a typo in the output path.)
pub fn check_output(path: &Path) -> io::Result<()> {
    let (dir, _) = split(path)?;
    let fail = |msg: String| Err(io::Error::new(io::ErrorKind::InvalidInput, msg));
    if path.is_dir() {
        return fail(format!(
            "{} is a directory, not an output file",
            path.display()
        ));
    }
    if !dir.is_dir() {
        return fail(format!(
            "{}: the folder {} does not exist",
            path.display(),
            dir.display()
        ));
    }
    Ok(())
}

fn split(path: &Path) -> io::Result<(PathBuf, std::ffi::OsString)> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a file path", path.display()),
        )
    })?;
    Ok((dir, name.to_os_string()))
}

/// Writes a file through a temporary sibling, flushed and renamed over `path`.
pub fn write_atomic(
    path: &Path,
    body: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> io::Result<()> {
    stage_atomic(path, body)?.commit()
}

/// Writes a temporary sibling of `path`, flushed, to be renamed over it by
/// [`Staged::commit`].
pub fn stage_atomic(
    path: &Path,
    body: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> io::Result<Staged> {
    let (dir, name) = split(path)?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let staged = Staged {
        tmp,
        path: path.to_path_buf(),
        dir,
        done: false,
    };
    let result = (|| {
        let file = File::create(&staged.tmp)?;
        let mut w = BufWriter::new(file);
        body(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()
    })();
    match result {
        Ok(()) => Ok(staged),
        Err(e) => Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_the_wrong_dtype() {
        let dir = std::env::temp_dir().join(format!("otmatch-npy-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.npy");
        write(&p, &[2, 3], &[1.5f32, 2.0, -3.0, 4.0, 5.0, 6.25]).unwrap();
        let (shape, v) = read::<f32>(&p).unwrap();
        assert_eq!(shape, vec![2, 3]);
        assert_eq!(v, vec![1.5, 2.0, -3.0, 4.0, 5.0, 6.25]);
        let e = read::<i64>(&p).unwrap_err().to_string();
        assert!(
            e.contains("expected int64 ('<i8'), found dtype '<f4'"),
            "{e}"
        );
        write(&p, &[4], &[1i64, -2, 3, 4]).unwrap();
        assert_eq!(read::<i64>(&p).unwrap(), (vec![4], vec![1, -2, 3, 4]));
        write(&p, &[2], &[true, false]).unwrap();
        assert_eq!(read::<bool>(&p).unwrap(), (vec![2], vec![true, false]));
        fs::write(&p, b"hello").unwrap();
        assert!(read::<f32>(&p)
            .unwrap_err()
            .to_string()
            .contains("not a .npy file"));
        let leftovers = fs::read_dir(&dir).unwrap().count();
        assert_eq!(leftovers, 1, "no temporary files left behind");
        fs::remove_dir_all(&dir).unwrap();
    }
}
