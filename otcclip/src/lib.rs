use pyo3::prelude::*;

#[pymodule]
fn _otmatch(_m: &Bound<'_, PyModule>) -> PyResult<()> {
    Ok(())
}
