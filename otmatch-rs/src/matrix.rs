//! A borrowed row-major `f32` matrix: how callers hand us embeddings without a copy.

use crate::error::{Error, Result};

/// A row-major, densely packed `rows x cols` view of `f32` values.
///
/// It borrows the caller's buffer (a numpy array, a memory-mapped `.npy`), so
/// that neither the Python binding nor the CLI ever copies the embeddings.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
}

impl<'a> MatRef<'a> {
    /// Wraps `data` as `rows x cols`; refuses a buffer of the wrong length.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Result<Self> {
        let want = rows
            .checked_mul(cols)
            .ok_or_else(|| Error::invalid(format!("shape ({rows}, {cols}) overflows usize")))?;
        if data.len() != want {
            return Err(Error::invalid(format!(
                "a ({rows}, {cols}) matrix needs {want} values, got {}",
                data.len()
            )));
        }
        Ok(MatRef { data, rows, cols })
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns (the embedding dimension).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The whole buffer, row after row.
    pub fn as_slice(&self) -> &'a [f32] {
        self.data
    }

    /// Row `i`.
    pub fn row(&self, i: usize) -> &'a [f32] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }
}
